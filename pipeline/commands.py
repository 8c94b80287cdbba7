"""Handlers of the `dcam` subcommands (argument parsing lives in pipeline/cli.py)."""
from __future__ import annotations

import json
import sys

from dcam.pipeline.config import load_config, to_dict


def emit(result: dict, as_json: bool, table: str | None = None) -> None:
    """Print a command's figures: one JSON object with --json, else the table (or indented JSON)."""
    if as_json:
        print(json.dumps(result, default=float))
    else:
        print(table if table is not None else json.dumps(result, indent=1, default=float))


def cmd_synth(args) -> int:
    from dcam.actors import scenes
    from dcam.pipeline.synth import write_corpus

    cfg = to_dict(load_config("synth", args.overrides))
    sc = scenes.SceneConfig(size=cfg["size"], min_objects=cfg["min_objects"], max_objects=cfg["max_objects"],
                            clutter=cfg["clutter"], prompt=cfg["prompt"])
    urls = write_corpus(cfg["output"], cfg["n"], cfg["seed"], cfg["shard_size"], sc, cfg.get("storage") or {})
    emit({"n": cfg["n"], "shards": urls}, args.json, f"wrote {cfg['n']} scenes in {len(urls)} shards to {cfg['output']}")
    return 0


def cmd_train_tiny(args) -> int:
    from dcam.training.train_tiny import QualityGateError, TrainConfig, train_tiny

    tc = TrainConfig(**to_dict(load_config("train_tiny", args.overrides)))
    try:
        report = train_tiny(tc, log=(lambda m: print(m, file=sys.stderr, flush=True)))
    except QualityGateError as e:
        print(f"quality gate failed, no checkpoint written: {e}", file=sys.stderr)
        return 2
    emit(report, args.json)
    return 0


def cmd_eval_tiny(args) -> int:
    from dcam.actors.models import load_backend
    from dcam.evals.eval_tiny import caption_quality
    from dcam.training.train_tiny import VALIDATION_SEED
    from dcam.actors.scenes import TRAIN_SEEDS

    cfg = to_dict(load_config("eval_tiny", args.overrides))
    if cfg["seed"] in TRAIN_SEEDS or cfg["seed"] == VALIDATION_SEED:
        print(f"seed {cfg['seed']} was used to train or select the model; pick another", file=sys.stderr)
        return 2
    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    q = caption_quality(backend.model, backend.tok, seed=cfg["seed"], n=cfg["n"], batch_size=cfg["batch_size"])
    table = (f"held-out scenes (seed {cfg['seed']}): n={q['n']}\n"
             f"  exact match   {q['exact_match']:.4f}\n  word accuracy {q['word_acc']:.4f}\n"
             f"  colour words  {q['colour_acc']:.4f}\n  shape words   {q['shape_acc']:.4f}")
    emit(q, args.json, table)
    return 0


def cmd_eval_cam(args) -> int:
    from dcam.evals.eval_cam import format_table, run_eval_cam

    cfg = to_dict(load_config("eval_cam", args.overrides))
    result = run_eval_cam(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    emit(result, args.json, format_table(result))
    return 0


def cmd_bench_refine(args) -> int:
    from dcam.benchmarks.bench_refine import run_bench_refine

    cfg = to_dict(load_config("bench_refine", args.overrides))
    emit(run_bench_refine(**cfg), args.json)
    return 0


def cmd_bench_probe(args) -> int:
    from dcam.benchmarks.bench_probe import run_bench_probe

    cfg = to_dict(load_config("bench_probe", args.overrides))
    emit(run_bench_probe(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)), args.json)
    return 0


def cmd_bench(args) -> int:
    from dcam.benchmarks.bench_pipeline import run_bench

    cfg = load_config("bench", args.overrides)
    emit(run_bench(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)), args.json)
    return 0


def cmd_run(args) -> int:
    from dcam.pipeline.job import run_job

    cfg = load_config("run", args.overrides)
    summary = run_job(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary, default=float))
    return int(summary.get("exit_code", 0))


def cmd_report(args) -> int:
    from dcam.pipeline.report.build import main_report

    return main_report(args)
