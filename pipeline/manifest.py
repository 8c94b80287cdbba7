"""Exactly-once resume: the run manifest, per-shard reconciliation, and compaction.

The run directory holds manifest.json: the config hash and every input shard with its row
count. A shard is complete when results/<shard_key>.<hash>.parquet exists (written only by
compaction, after every input row of the shard was accounted for). On a rerun, shards with
part files but no final file are either compacted (all rows present) or deleted (partial) and
processed again, in one streaming execution. `_SUCCESS` is written when all shards are complete.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcam.actors.schema import DEDUP_KEY
from dcam.pipeline.sinks import final_name
from dcam.pipeline.sources import ShardSpec, count_rows
from dcam.pipeline.storage import open_fs, with_retries

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"


class RunConflictError(RuntimeError):
    """The output directory holds a run made with another configuration or input."""


@dataclass
class ShardEntry:
    url: str
    format: str
    shard_key: str
    rows: int

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(self.url, self.format, self.shard_key)


@dataclass
class RunDir:
    """Paths of a run directory on its filesystem."""
    url: str
    storage_options: dict = field(repr=False)  # may hold credentials

    def __post_init__(self):
        self.fs, self.root = open_fs(self.url, self.storage_options)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_text(self, rel: str, text: str) -> None:
        p = self.path(rel)
        self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: self.fs.pipe_file(p, text.encode()))

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(self.path(rel)).decode()

    def ls(self, rel: str) -> list[str]:
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(f for f in self.fs.ls(p, detail=False))


def load_or_create_manifest(run: RunDir, config_hash: str, input_url: str, shards: list[ShardSpec],
                            source_cfg: dict, log=print) -> list[ShardEntry]:
    if run.exists(MANIFEST):
        doc = json.loads(run.read_text(MANIFEST))
        if doc["config_hash"] != config_hash:
            raise RunConflictError(
                f"{run.url} holds a run with config {doc['config_hash']}, this command has {config_hash}: "
                "use another output directory (results of different configs are not mixed)")
        listed = {s.url for s in shards}
        known = {e["url"] for e in doc["shards"]}
        if listed != known:
            raise RunConflictError(f"{run.url}: the input now lists {len(listed)} shards, the manifest {len(known)} "
                                   f"({len(listed - known)} new, {len(known - listed)} gone); use another output directory")
        return [ShardEntry(**e) for e in doc["shards"]]
    log(f"counting rows of {len(shards)} input shards")
    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(lambda s: count_rows(s, run.storage_options, source_cfg), shards))
    entries = [ShardEntry(s.url, s.format, s.shard_key, int(c)) for s, c in zip(shards, counts)]
    doc = dict(version=1, config_hash=config_hash, input=input_url, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               shards=[asdict(e) for e in entries], total_rows=sum(counts))
    run.write_text(MANIFEST, json.dumps(doc, indent=1))
    return entries


def parts_of(run: RunDir, entry: ShardEntry, config_hash: str) -> list[str]:
    prefix = f"{entry.shard_key}.{config_hash}."
    return [p for p in run.ls("results/_parts") if p.rsplit("/", 1)[-1].startswith(prefix)]


def distinct_rows(run: RunDir, parts: list[str]) -> int:
    seen: set[int] = set()
    for p in parts:
        with run.fs.open(p, "rb") as f:
            seen.update(pq.read_table(f, columns=["row_index"]).column(0).to_pylist())
    return len(seen)


def compact(run: RunDir, entry: ShardEntry, config_hash: str, parts: list[str]) -> int:
    """Merge a complete shard's parts into its final file (deduplicated); returns output rows."""
    from dcam.pipeline.sinks import SCHEMA

    tables = [SCHEMA.empty_table()]
    for p in parts:
        with run.fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    table = deduplicate(pa.concat_tables(tables))
    final = run.path("results", final_name(entry.shard_key, config_hash))
    tmp = final + ".tmp"
    with run.fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    run.fs.mv(tmp, final)
    for p in parts:
        run.fs.rm(p)
    return table.num_rows


def deduplicate(table: pa.Table) -> pa.Table:
    """Sort by (row_index, method, token_index, step) and keep the first row of each key."""
    keys = [(k, "ascending") for k in DEDUP_KEY]
    table = table.sort_by(keys)
    cols = [pc.fill_null(table.column(k), -1 if k != "method" else "") for k in DEDUP_KEY]
    arrays = [np.asarray(c.to_numpy(zero_copy_only=False)) for c in cols]
    same = np.ones(max(0, table.num_rows - 1), dtype=bool)
    for a in arrays:
        same &= a[1:] == a[:-1]
    keep = np.concatenate([[True], ~same]) if table.num_rows else np.zeros(0, bool)
    return table.filter(pa.array(keep))


def reconcile(run: RunDir, entries: list[ShardEntry], config_hash: str, log=print) -> tuple[list, list]:
    """(complete, pending) shard entries; compacts complete-but-uncompacted shards and deletes
    the parts of partial ones."""
    complete, pending = [], []
    finals = {p.rsplit("/", 1)[-1] for p in run.ls("results")}
    for e in entries:
        if final_name(e.shard_key, config_hash) in finals:
            complete.append(e)
            continue
        parts = parts_of(run, e, config_hash)
        if e.rows == 0 or (parts and distinct_rows(run, parts) == e.rows):
            compact(run, e, config_hash, parts)
            complete.append(e)
        else:
            if parts:
                log(f"shard {e.url}: partial output ({len(parts)} part files) deleted; it will be processed again")
                for p in parts:
                    run.fs.rm(p)
            pending.append(e)
    return complete, pending
