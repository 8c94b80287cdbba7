"""Exactly-once resume: the run manifest, per-shard reconciliation and the accounting.

The run directory holds manifest.json: the config hash and every input shard with its row
count. A shard is complete when results/<shard_key>.<hash>.parquet exists and holds every one of
the shard's input rows (each row_index ok or error; written only by compaction,
pipeline/compaction.py). On a rerun, final files are verified against the manifest (a short one
is moved to _staging/rejected/ and its shard processed again), shards with part files but no
final file are either compacted (all rows present) or their parts deleted (partial), and only
pending shards are processed, in one streaming execution. `_SUCCESS` is written only when the
accounting is exact: every shard's final file holds exactly its input rows.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from dcam.pipeline.compaction import compact, final_input_rows, input_rows, parts_by_shard
from dcam.pipeline.layout import (
    MANIFEST,
    OLD_PARTS,
    PARTS,
    REJECTED,
    RESULTS,
    SUCCESS,
    TMP,
    OverlapError,
    RunDir,
    check_disjoint,
)
from dcam.pipeline.sinks import final_name
from dcam.pipeline.sources import ShardSpec, count_rows

__all__ = ["MANIFEST", "SUCCESS", "Accounting", "RunConflictError", "RunDir", "ShardEntry", "load_or_create_manifest",
           "reconcile"]


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


def refuse_input_inside_run(run: RunDir) -> None:
    """A run directory whose manifest names an input inside it (the no-argument layout before
    issue 18 kept its corpus in <output>/input) is refused before anything else happens."""
    if not run.exists(MANIFEST):
        return
    recorded = json.loads(run.read_text(MANIFEST)).get("input")
    try:
        if recorded:
            check_disjoint(str(recorded), run.url, run.storage_options)
    except OverlapError:
        raise RunConflictError(
            f"{run.url} was written by an older dcam whose run kept its input inside the run directory ({recorded}); "
            f"an input inside the output is refused now: delete {run.url} or choose another output (the no-argument "
            "run now synthesises its input beside the run, in <output>-input)") from None


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




@dataclass
class Accounting:
    """Input rows the manifest expects vs input rows present in final files, per shard."""
    expected: dict[str, int] = field(default_factory=dict)  # shard URL -> manifest rows
    present: dict[str, int] = field(default_factory=dict)  # shard URL -> rows in its verified final file

    @property
    def exact(self) -> bool:
        return all(self.present.get(u) == n for u, n in self.expected.items())

    def to_dict(self) -> dict:
        short = [dict(shard=u, expected=n, present=self.present.get(u, 0)) for u, n in self.expected.items()
                 if self.present.get(u) != n]
        return dict(expected_inputs=sum(self.expected.values()), present_inputs=sum(self.present.values()),
                    shards=len(self.expected), shards_complete=len(self.expected) - len(short), exact=self.exact,
                    short_shards=short[:20])

    def describe(self) -> str:
        d = self.to_dict()
        return (f"accounting: {d['present_inputs']} of {d['expected_inputs']} input rows in final files, "
                f"{d['shards_complete']} of {d['shards']} shards complete")


@dataclass
class Reconciliation:
    complete: list[ShardEntry]
    pending: list[ShardEntry]
    accounting: Accounting
    changed: bool = False  # a final file was written (compaction) or moved aside: results differ from before


def reconcile(run: RunDir, entries: list[ShardEntry], config_hash: str, log=print, fence=None) -> Reconciliation:
    """Verify final files, compact complete-but-uncompacted shards, delete the parts of partial
    ones; returns which shards are complete, which pending, and the accounting."""
    migrate_old_layout(run, log)
    _remove_all(run, run.ls(TMP))  # a compaction that did not finish (this driver holds the lease)
    acct = Accounting(expected={e.url: e.rows for e in entries})
    # One listing each of results/ and of the parts, shared by every shard: a listing per shard
    # made a resume O(shards x parts) in time and requests (issue 17: 2,000 shards on S3).
    finals = run.sizes(RESULTS)
    parts_of_shard = parts_by_shard(run.ls(PARTS), entries, config_hash)
    with ThreadPoolExecutor(8) as pool:  # one column of every final file: parallel on object stores
        present = dict(zip([e.url for e in entries],
                           pool.map(lambda e: final_input_rows(run, e, config_hash, finals), entries)))
    complete, pending, changed = [], [], False
    for e in entries:
        parts = parts_of_shard[e.shard_key]
        if present[e.url] is not None and present[e.url] != e.rows:
            reject_final(run, e, config_hash, present[e.url], log)
            changed = True
        elif present[e.url] is not None:
            _remove_all(run, parts)  # written again by a retried task after compaction
            acct.present[e.url] = e.rows
            complete.append(e)
            continue
        if e.rows == 0 or (parts and len(input_rows(run, parts) & set(range(e.rows))) == e.rows):
            compact(run, e, config_hash, parts, fence)
            acct.present[e.url] = e.rows
            complete.append(e)
            changed = True
        else:
            if parts:
                log(f"shard {e.url}: partial output ({len(parts)} part files) deleted; it will be processed again")
                _remove_all(run, parts)
            pending.append(e)
    return Reconciliation(complete, pending, acct, changed)


def reject_final(run: RunDir, entry: ShardEntry, config_hash: str, present: int, log) -> None:
    """A final file that does not hold exactly its shard's input rows: moved aside (kept for
    inspection, out of results/) and the shard processed again."""
    name = final_name(entry.shard_key, config_hash)
    aside = run.path(REJECTED, f"{name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    log(f"WARNING: final file of shard {entry.url} holds {present} of its {entry.rows} input rows: moved to "
        f"{aside}; the shard will be processed again")
    run.fs.makedirs(run.path(REJECTED), exist_ok=True)
    run.fs.mv(run.path(RESULTS, name), aside)


def migrate_old_layout(run: RunDir, log) -> None:
    """Runs written before issue 18 kept part files in results/_parts/ and temporary files in
    results/: move the parts to _staging/parts/ (they are resumed as usual), drop the temporaries."""
    old_parts = run.ls(OLD_PARTS)
    stray_tmp = [p for p in run.ls(RESULTS) if p.endswith(".tmp")]
    if not old_parts and not stray_tmp:
        return
    log(f"moving {len(old_parts)} part files of the previous layout from {OLD_PARTS}/ to {PARTS}/")
    run.fs.makedirs(run.path(PARTS), exist_ok=True)
    for p in old_parts:
        run.fs.mv(p, run.path(PARTS, p.rsplit("/", 1)[-1]))
    _remove_all(run, stray_tmp)
    if run.fs.exists(run.path(OLD_PARTS)):
        run.fs.rm(run.path(OLD_PARTS), recursive=True)


def _remove_all(run: RunDir, paths: list[str]) -> None:
    for p in paths:
        if run.fs.exists(p):
            run.fs.rm(p)
