"""Portable Parquet output: plain Arrow types only (no Ray extension types), so results open with
pyarrow, pandas, duckdb or Spark without Ray.

Layout under the run directory (any fsspec URL; pipeline/layout.py):
    results/<shard_key>.<config_hash>.parquet                    final, one file per input shard
    _staging/parts/<shard_key>.<config_hash>.<lo>-<hi>.parquet   written while the job runs
A part file holds every output row of the input rows lo..hi of one shard (an input row's rows
are never split across files). When a shard is complete its parts are compacted into the final
file (pipeline/compaction.py), de-duplicated on (row_index, method, token_index, step): a retried
block can never duplicate rows. Names depend only on the input shard, the rows and the config
hash, so a rerun overwrites instead of adding. results/ never holds anything but final files.
"""
from __future__ import annotations

import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcam.actors.schema import COLUMNS
from dcam.pipeline.layout import PARTS

ARROW_TYPES = {"string": pa.string(), "bool": pa.bool_(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(),
               "binary": pa.binary(), "list<float32>": pa.list_(pa.float32())}
SCHEMA = pa.schema([(c.name, ARROW_TYPES[c.type]) for c in COLUMNS])
# CPU seconds per CPU stage, summed per shard of a written batch and reported to the driver
# (pipeline.job: summary.json timing.cpu_s_per_image; dcam bench-scale sizes CPU per GPU from it).
CPU_COLUMNS = ("decode_cpu_s", "refine_cpu_s", "write_cpu_s")


def records_table(records: list[dict]) -> pa.Table:
    """Arrow table in SCHEMA order; missing keys are null."""
    cols = {}
    for field in SCHEMA:
        vals = [r.get(field.name) for r in records]
        if pa.types.is_list(field.type):
            vals = [None if v is None else np.asarray(v, dtype=np.float32) for v in vals]
        cols[field.name] = pa.array(vals, type=field.type)
    return pa.table(cols, schema=SCHEMA)


def part_name(shard_key: str, config_hash: str, lo: int, hi: int) -> str:
    return f"{shard_key}.{config_hash}.{lo:09d}-{hi:09d}.parquet"


def final_name(shard_key: str, config_hash: str) -> str:
    return f"{shard_key}.{config_hash}.parquet"


class WriteStage:
    """Ray map_batches callable: writes each shard's rows of the batch as one part file and
    returns a small summary (per shard: input rows, ok rows, error kinds) for the driver."""

    def __init__(self, run_dir: str, config_hash: str, shard_keys: dict[str, str], storage_options: dict | None = None):
        self.run_dir = run_dir.rstrip("/")
        self.config_hash = config_hash
        self.shard_keys = shard_keys  # shard URL -> shard_key
        self.storage_options = storage_options or {}
        self._fs = None

    def _filesystem(self):
        if self._fs is None:
            from dcam.pipeline.storage import open_fs

            self._fs, root = open_fs(self.run_dir, self.storage_options)
            self._root = root.rstrip("/")
        return self._fs, self._root

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dcam.pipeline.storage import retry_settings, secrets_of, with_retries

        fs, root = self._filesystem()
        by_shard: dict[str, list[int]] = {}
        for i, shard in enumerate(batch["shard"]):
            by_shard.setdefault(str(shard), []).append(i)
        summary = {"shard": [], "inputs": [], "ok": [], "errors": [], **{k: [] for k in CPU_COLUMNS}}
        for shard, idx in by_shard.items():
            cpu0 = time.process_time()
            rows = [int(batch["row_index"][i]) for i in idx]
            path = f"{root}/{PARTS}/{part_name(self.shard_keys[shard], self.config_hash, min(rows), max(rows))}"
            table = records_table(_with_refine_ms(batch, idx))
            attempts, base = retry_settings(self.storage_options)
            with_retries(lambda: _write(fs, path, table), attempts, base, secrets=secrets_of(self.storage_options))
            errors = [str(batch["error_kind"][i] or "error") for i in idx if batch["status"][i] != "ok"]
            summary["shard"].append(shard)
            summary["inputs"].append(len(idx))
            summary["ok"].append(len(idx) - len(errors))
            summary["errors"].append(",".join(errors))
            summary["write_cpu_s"].append(time.process_time() - cpu0)
            for k in ("decode_cpu_s", "refine_cpu_s"):  # earlier stages' CPU, carried per row
                summary[k].append(float(np.nansum(np.asarray(batch[k], dtype=np.float64)[idx])) if k in batch else 0.0)
        return {k: np.array(v, dtype=object if k in ("shard", "errors") else np.float64 if k in CPU_COLUMNS
                            else np.int64) for k, v in summary.items()}


def _with_refine_ms(batch, idx: list[int]) -> list[dict]:
    out = []
    for i in idx:
        for r in pickle.loads(batch["records"][i]):
            r["refine_ms"] = float(batch["refine_ms"][i])
            out.append(r)
    return out


def _write(fs, path: str, table: pa.Table) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
