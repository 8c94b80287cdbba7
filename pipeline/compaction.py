"""A shard's part files -> its one final result file, and the check that a final file holds
exactly its shard's input rows.

A part file (pipeline/sinks.py) holds every output row of some input rows of one shard. When every
input row of the shard is present, the parts are merged, de-duplicated on (row_index, method,
token_index, step), written under _staging/tmp/ and moved into results/ (an atomic rename on local
disk, a single object on S3), then deleted. Compaction refuses when a row is missing (the parts
were deleted or never written) and never replaces a final file that already holds every input
row: a late or concurrent driver can neither write an empty table over good results nor
duplicate them. `fence` (the output lease's) runs right before the move.
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcam.actors.schema import DEDUP_KEY
from dcam.pipeline.layout import PARTS, RESULTS, TMP
from dcam.pipeline.sinks import final_name


class ShardIncompleteError(RuntimeError):
    """A shard's part files do not hold every one of its input rows."""


def parts_of(run, entry, config_hash: str) -> list[str]:
    """The shard's part files (one listing of _staging/parts; reconcile uses parts_by_shard)."""
    prefix = f"{entry.shard_key}.{config_hash}."
    return [p for p in run.ls(PARTS) if p.rsplit("/", 1)[-1].startswith(prefix)]


def parts_by_shard(listing: list[str], entries, config_hash: str) -> dict[str, list[str]]:
    """shard_key -> its part files, for every entry, from one listing of _staging/parts, in
    O(parts + shards): a part's name is <shard_key>.<hash>.<lo>-<hi>.parquet."""
    keys = {e.shard_key for e in entries}
    out: dict[str, list[str]] = {k: [] for k in keys}
    for p in listing:
        head, sep, _ = p.rsplit("/", 1)[-1].rpartition(f".{config_hash}.")
        if sep and head in keys:
            out[head].append(p)
    return out


# A Parquet file up to this size is fetched whole in one request (object stores: one GET instead
# of a size request, a footer read and a column read); larger ones read their footer and columns.
SMALL_FILE_BYTES = 8 << 20


def read_columns(run, path: str, columns: list[str], size: int | None = None, fill_missing: bool = False) -> pa.Table:
    """`columns` of one Parquet file of the run; `size` (from a listing) lets a small file come
    in one request. fill_missing: a column the file lacks (written by an older dcam) comes back
    all-null instead of raising."""
    if size is not None and size <= SMALL_FILE_BYTES:
        source = pa.BufferReader(run.fs.cat_file(path))
        return _read(pq.ParquetFile(source), columns, fill_missing)
    with run.fs.open(path, "rb") as f:
        return _read(pq.ParquetFile(f), columns, fill_missing)


def _read(pf: pq.ParquetFile, columns: list[str], fill_missing: bool) -> pa.Table:
    have = set(pf.schema_arrow.names)
    if not fill_missing or all(c in have for c in columns):
        return pf.read(columns=columns, use_threads=False)
    from dcam.pipeline.sinks import SCHEMA

    t = pf.read(columns=[c for c in columns if c in have], use_threads=False)
    return pa.table({c: t[c] if c in have else pa.nulls(t.num_rows, SCHEMA.field(c).type) for c in columns})


def input_rows(run, paths: list[str], sizes: dict[str, int] | None = None) -> set[int]:
    """Distinct row_index values over result or part files (reads that one column only)."""
    seen: set[int] = set()
    for p in paths:
        size = (sizes or {}).get(p.rsplit("/", 1)[-1])
        seen.update(read_columns(run, p, ["row_index"], size).column(0).to_pylist())
    return seen


def final_input_rows(run, entry, config_hash: str, finals: dict[str, int] | None = None) -> int | None:
    """How many of the shard's input rows its final file holds (None: no final file). Rows
    outside 0..rows-1 are not counted. `finals`: name -> size from one listing of results/ (no
    existence request per shard, small files in one request)."""
    name = final_name(entry.shard_key, config_hash)
    path = run.path(RESULTS, name)
    if (name not in finals) if finals is not None else not run.fs.exists(path):
        return None
    return len(input_rows(run, [path], finals) & set(range(entry.rows)))


def compact(run, entry, config_hash: str, parts: list[str], fence=None) -> int:
    """Merge a complete shard's parts into its final file; returns the final file's output rows.
    Raises ShardIncompleteError (and writes nothing) unless the parts hold every input row."""
    from dcam.pipeline.sinks import SCHEMA

    tables = [SCHEMA.empty_table()]
    try:
        for p in parts:
            with run.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f))
    except FileNotFoundError as e:
        raise ShardIncompleteError(f"shard {entry.url}: a part file disappeared during compaction ({e})") from None
    table = deduplicate(pa.concat_tables(tables))
    present = set(table.column("row_index").to_pylist())
    if present != set(range(entry.rows)):
        raise ShardIncompleteError(f"shard {entry.url}: its part files hold {len(present & set(range(entry.rows)))} "
                                   f"of {entry.rows} input rows; not compacted")
    final = run.path(RESULTS, final_name(entry.shard_key, config_hash))
    if final_input_rows(run, entry, config_hash) == entry.rows:
        with run.fs.open(final, "rb") as f:
            kept = pq.ParquetFile(f).metadata.num_rows
        _remove(run, parts)  # already final (another compaction won): keep it, never replace it
        return kept
    tmp = run.path(TMP, f"{final.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp")
    run.fs.makedirs(run.path(TMP), exist_ok=True)
    with run.fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    if fence is not None:
        fence(f"writing the final file of shard {entry.url}")
    run.fs.makedirs(run.path(RESULTS), exist_ok=True)
    run.fs.mv(tmp, final)
    _remove(run, parts)
    return table.num_rows


def _remove(run, paths: list[str]) -> None:
    for p in paths:
        if run.fs.exists(p):
            run.fs.rm(p)


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
