"""Handlers of the `dcam` subcommands (argument parsing lives in pipeline/cli.py)."""
from __future__ import annotations

import json
import sys

from pipeline.cli import _emit
from pipeline.config import load_config, to_dict


def cmd_synth(args) -> int:
    from actors import scenes
    from pipeline.synth import write_corpus

    cfg = to_dict(load_config("synth", args.overrides))
    sc = scenes.SceneConfig(size=cfg["size"], min_objects=cfg["min_objects"], max_objects=cfg["max_objects"],
                            clutter=cfg["clutter"], prompt=cfg["prompt"])
    urls = write_corpus(cfg["output"], cfg["n"], cfg["seed"], cfg["shard_size"], sc, cfg.get("storage") or {})
    _emit({"n": cfg["n"], "shards": urls}, args.json, f"wrote {cfg['n']} scenes in {len(urls)} shards to {cfg['output']}")
    return 0


def cmd_train_tiny(args) -> int:
    from actors.models.train_tiny import QualityGateError, TrainConfig, train_tiny

    tc = TrainConfig(**to_dict(load_config("train_tiny", args.overrides)))
    try:
        report = train_tiny(tc, log=(lambda m: print(m, file=sys.stderr, flush=True)))
    except QualityGateError as e:
        print(f"quality gate failed, no checkpoint written: {e}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    return 0


def cmd_eval_tiny(args) -> int:
    from actors.models import load_backend
    from actors.models.caption_eval import caption_quality
    from actors.models.train_tiny import VALIDATION_SEED
    from actors.scenes import TRAIN_SEEDS

    cfg = to_dict(load_config("eval_tiny", args.overrides))
    if cfg["seed"] in TRAIN_SEEDS or cfg["seed"] == VALIDATION_SEED:
        print(f"seed {cfg['seed']} was used to train or select the model; pick another", file=sys.stderr)
        return 2
    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    q = caption_quality(backend.model, backend.tok, seed=cfg["seed"], n=cfg["n"], batch_size=cfg["batch_size"])
    table = (f"held-out scenes (seed {cfg['seed']}): n={q['n']}\n"
             f"  exact match   {q['exact_match']:.4f}\n  word accuracy {q['word_acc']:.4f}\n"
             f"  colour words  {q['colour_acc']:.4f}\n  shape words   {q['shape_acc']:.4f}")
    _emit(q, args.json, table)
    return 0


def cmd_eval_cam(args) -> int:
    from actors.eval_cam import format_table, run_eval_cam

    cfg = to_dict(load_config("eval_cam", args.overrides))
    result = run_eval_cam(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    _emit(result, args.json, format_table(result))
    return 0


def cmd_bench_refine(args) -> int:
    from actors.bench_refine import run_bench_refine

    cfg = to_dict(load_config("bench_refine", args.overrides))
    _emit(run_bench_refine(**cfg), args.json)
    return 0


def cmd_bench_probe(args) -> int:
    from actors.bench_probe import run_bench_probe

    cfg = to_dict(load_config("bench_probe", args.overrides))
    _emit(run_bench_probe(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)), args.json)
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench import run_bench

    cfg = load_config("bench", args.overrides)
    _emit(run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)), args.json)
    return 0


def cmd_run(args) -> int:
    from pipeline.job import run_job

    cfg = load_config("run", args.overrides)
    summary = run_job(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary, default=float))
    return int(summary.get("exit_code", 0))


def cmd_report(args) -> int:
    from pipeline.report import main_report

    return main_report(args)
