"""`dcam bench`: the same probe + refine (a) as a plain in-process batched loop, (b) through the
Ray pipeline, (c) as a batch-1 loop, on the same synthetic scenes, in one run.

The loops decode the same shards first (decode time is included in all three: the pipeline
decodes too). The pipeline figure is split into start-up (ray init, actor start, model load,
first batch) and steady state (rows after the first output batch / time after it).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import List

import numpy as np

from dcam.actors import scenes
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log


def _decoded_rows(shard_urls: list[str], d: dict) -> dict[str, np.ndarray]:
    from dcam.pipeline.decode import DecodeStage
    from dcam.pipeline.sources import list_shards, read_shard

    rows = [r for s in list_shards(os.path.dirname(shard_urls[0]), "parquet") for r in read_shard(s, {}, d["source"])]
    raw = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return DecodeStage(d)(raw)


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def _loop_ips(actor, stage, decoded: dict, batch_size: int) -> float:
    n = len(decoded["id"])
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        stage(actor(_slice(decoded, lo, lo + batch_size)))
    return n / (time.perf_counter() - t0)


def run_bench(cfg, log=print) -> dict:
    from dcam.actors.probe_actor import ProbeActor
    from dcam.actors.score_stage import RefineScoreStage
    from dcam.pipeline.config import config_hash, load_config
    from dcam.pipeline.job import run_job
    from dcam.pipeline.synth import write_corpus

    d = to_dict(cfg)
    tmp = tempfile.mkdtemp(prefix="dcam-bench-")
    urls = write_corpus(f"{tmp}/input", int(d["n"]), int(d["seed"]), int(d["shard_size"]), scenes.SceneConfig(),
                        with_response=False)
    run_cfg = load_config("run", [f"input={tmp}/input", f"output={tmp}/run", "report.enabled=false",
                                  f"probe.batch_size={d['batch_size']}", *d.get("run_overrides", [])])
    rd = to_dict(run_cfg)
    decoded = _decoded_rows(urls, rd)
    actor = ProbeActor(rd["model"], rd["methods"], rd["probe"])
    stage = RefineScoreStage(rd["methods"], rd["sink"], config_hash(run_cfg))
    stage(actor(_slice(decoded, 0, 4)))  # warm-up
    loop = _loop_ips(actor, stage, decoded, int(d["batch_size"]))
    log(f"(a) in-process batched loop: {loop:.2f} images/s")
    single = _loop_ips(actor, stage, _slice(decoded, 0, int(d["single_n"])), 1)
    log(f"(c) batch-1 loop ({d['single_n']} images): {single:.2f} images/s")
    summary = run_job(run_cfg, log=log)
    t = summary["timing"]
    log(f"(b) pipeline: start-up {t['startup_s']:.1f}s, steady state {t['steady_rows_per_s']:.2f} images/s")
    pipe = t["steady_rows_per_s"]
    return dict(n=int(d["n"]), batch_size=int(d["batch_size"]), loop_ips=loop, pipeline_ips=pipe, single_ips=single,
                pipeline_over_loop=pipe / loop, pipeline_over_single=pipe / single, startup_s=t["startup_s"],
                pipeline_total_s=t["total_s"], regime="per-image compute dominated (tiny model on CPU)")


@dataclass
class BenchConfig:
    """conf/bench.yaml."""
    n: int = key(ge=1)
    single_n: int = key(ge=1)
    seed: int = key()
    shard_size: int = key(ge=1)
    batch_size: int = key(ge=1)
    run_overrides: List[str] = key()

    @staticmethod
    def cross_check(cfg) -> str | None:
        """run_overrides are `dcam run` overrides: validated now, not after the corpus is written."""
        from dcam.pipeline.config import ConfigError

        try:
            load_config("run", ["input=/validate", "output=/validate", *cfg.run_overrides])
        except ConfigError as e:
            return f"run_overrides: {e}"
        return None


def command(args) -> int:
    """`dcam bench [--json] [k=v ...]`."""
    cfg = load_config("bench", args.overrides, schema=BenchConfig)
    emit(run_bench(cfg, log=log), args.json)
    return 0
