"""Helpers shared by the job-level tests (not a test module)."""
from __future__ import annotations

import pyarrow.dataset as pads

from dcam.pipeline.config import load_config
from dcam.pipeline.job import run_job

FAST = ["probe.faithfulness_steps=2", "report.enabled=false", "probe.batch_size=8", "actors.num_gpus=1",
        "ray.progress_bars=false"]


def _run(overrides, log=lambda m: None):
    return run_job(load_config("run", overrides), log=log)


def _results(url, storage_options=None):
    from dcam.pipeline.manifest import RunDir

    run = RunDir(url, storage_options or {})
    return pads.dataset(run.path("results"), filesystem=run.fs, format="parquet").to_table()


def _keys(t):
    return sorted(zip(t["shard"].to_pylist(), t["row_index"].to_pylist(), t["method"].to_pylist(),
                      t["token_index"].to_pylist(), t["step"].to_pylist()), key=str)


