"""Handlers of the pipeline's own subcommands: run, synth, report (argument parsing: pipeline/cli.py;
the evaluation, benchmark and training commands live beside their code)."""
from __future__ import annotations

import json

from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.console import emit, log


def synth(args) -> int:
    from dcam.actors import scenes
    from dcam.pipeline.synth import write_corpus

    cfg = to_dict(load_config("synth", args.overrides))
    sc = scenes.SceneConfig(size=cfg["size"], min_objects=cfg["min_objects"], max_objects=cfg["max_objects"],
                            clutter=cfg["clutter"], prompt=cfg["prompt"])
    urls = write_corpus(cfg["output"], cfg["n"], cfg["seed"], cfg["shard_size"], sc, cfg.get("storage") or {},
                        with_response=cfg["with_response"])
    given = "with captions as responses" if cfg["with_response"] else "without responses (the model answers)"
    emit({"n": cfg["n"], "shards": urls, "with_response": cfg["with_response"]}, args.json,
         f"wrote {cfg['n']} scenes in {len(urls)} shards to {cfg['output']}, {given}")
    return 0


def run(args) -> int:
    from dcam.pipeline.job import run_job
    from dcam.pipeline.layout import OverlapError
    from dcam.pipeline.lease import EXIT_OUTPUT_BUSY, LeaseHeldError, LeaseLostError

    cfg = load_config("run", args.overrides)
    try:
        summary = run_job(cfg, log=log)
    except (LeaseHeldError, LeaseLostError) as e:
        log(f"dcam run: {e}")
        return EXIT_OUTPUT_BUSY
    except OverlapError as e:
        log(f"dcam run: {e}")
        return 2
    if args.json:
        print(json.dumps(summary, default=float))
    return int(summary.get("exit_code", 0))


def report(args) -> int:
    from dcam.pipeline.report.build import main_report

    return main_report(args)
