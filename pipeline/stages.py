"""The job's CPU stages, as Ray Data runs them: module-level functions (shipped to tasks by
reference) over callable stage classes built once per worker process.

Ray Data runs a callable class only inside an actor pool, which reserves its CPUs for the whole
job and must be sized per cluster. The CPU stages hold nothing but their configuration, so dcam
runs them as tasks (Ray Data scales tasks to the free CPUs) and keeps one instance per (class,
configuration) in each worker process: `__init__` runs once per worker, `__call__(batch)` is pure.
The GPU stage (actors.probe_actor.ProbeActor) holds a model replica and runs in an actor pool.
"""
from __future__ import annotations

import json
import time

from dcam.actors.score_stage import RefineScoreStage
from dcam.pipeline.decode import DecodeStage
from dcam.pipeline.sinks import WriteStage
from dcam.pipeline.sources import ShardSpec, read_shard
from dcam.pipeline.storage import describe_error, secrets_of

_INSTANCES: dict[tuple, object] = {}


def stage_instance(cls, **kwargs):
    """The worker process's instance of `cls(**kwargs)`, built on first use."""
    key = (cls.__module__, cls.__qualname__, json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(**kwargs)
    return _INSTANCES[key]


def read_rows(item: dict, storage_options: dict, source: dict):
    """One shard -> its raw rows. A shard that fails mid-read still yields one error row for each
    of its remaining rows (ids derived from the shard), so input and output counts always match."""
    spec = ShardSpec(item["url"], item["format"], item["shard_key"])
    n = 0
    try:
        for row in read_shard(spec, storage_options, source):
            n += 1
            yield row
    except Exception as e:  # noqa: BLE001 - recorded on every remaining row, never swallowed
        reason = f"shard read failed after {n} rows: {describe_error(e, secrets_of(storage_options))}"
        for k in range(n, int(item["rows"])):
            yield dict(id=f"{spec.shard_key}-{k}", shard=spec.url, row_index=k, image=None, image_uri=None,
                       prompt=None, response=None, mask=None, objects=None, status="error", error=reason,
                       error_kind="shard_read")


def read_decoded_rows(item: dict, cfg: dict):
    """One shard -> its decoded rows (read and decode fused in one CPU task: one worker import,
    no intermediate block of encoded images). Each row carries `decode_cpu_s`: this process's CPU
    seconds spent reading and decoding it (time.process_time; the time Ray spends with the yielded
    row is not counted). The write stage sums it per shard for the driver (CPU per stage)."""
    stage = stage_instance(DecodeStage, cfg=cfg)
    mark = time.process_time()
    for raw in read_rows(item, cfg.get("storage") or {}, cfg["source"]):
        row = stage.decode_one(raw)
        row["decode_cpu_s"] = time.process_time() - mark
        yield row
        mark = time.process_time()


def refine_score_batch(batch, methods: dict, sink_cfg: dict, cfg_hash: str):
    """Refine + score + lay out records (actors.score_stage.RefineScoreStage), CPU."""
    return stage_instance(RefineScoreStage, methods=methods, sink_cfg=sink_cfg, config_hash=cfg_hash)(batch)


def write_batch(batch, run_url: str, cfg_hash: str, shard_keys: dict, storage_options: dict):
    """One part file per shard of the batch (pipeline.sinks.WriteStage)."""
    return stage_instance(WriteStage, run_dir=run_url, config_hash=cfg_hash, shard_keys=shard_keys,
                          storage_options=storage_options)(batch)
