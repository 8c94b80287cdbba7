"""Helpers shared by the job-level tests (not a test module)."""
from __future__ import annotations

import numpy as np
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




def _upload(directory, bucket, prefix):
    """Copy a local checkpoint directory (flat) to s3://bucket/prefix; returns the URL."""
    import fsspec

    fs = fsspec.filesystem("s3", **{k: bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")})
    for f in directory.iterdir():
        fs.put_file(str(f), f"{bucket.name}/{prefix}/{f.name}")
    return f"{bucket.url}/{prefix}"


def _maps(t):
    """The maps of a results table in a fixed row order."""
    order = np.argsort([str(k) for k in zip(t["row_index"].to_pylist(), t["token_index"].to_pylist(),
                                             t["method"].to_pylist(), t["step"].to_pylist())])
    return [np.asarray(t["map"][int(i)].as_py(), np.float32) for i in order]
