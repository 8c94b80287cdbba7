"""Compaction, verification and the accounting (issue 18 items 1 and 6) without Ray, on local disk
and on S3 (moto on 127.0.0.1): a final file is written only from parts holding every input row,
never replaced by fewer rows, verified against the manifest on every reconcile; results/ only
ever holds final files; runs of the previous layout (parts in results/_parts/) resume."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from dcam.pipeline.compaction import ShardIncompleteError, compact, parts_of
from dcam.pipeline.layout import RunDir
from dcam.pipeline.manifest import ShardEntry, reconcile
from dcam.pipeline.sinks import final_name, part_name, records_table

H = "cfghash00001"


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"), {})
    bucket = request.getfixturevalue("s3_bucket")
    return RunDir(f"{bucket.url}/run", bucket.storage_options)


def _entry(k: int, rows: int) -> ShardEntry:
    return ShardEntry(f"s3://corpus/shard-{k}.parquet", "parquet", f"shard-{k}-abc", rows)


def _records(e: ShardEntry, rows, value: float = 0.5) -> list[dict]:
    """Two output rows (explained tokens) per ok input row, one per error row."""
    out = []
    for i in rows:
        if i % 5 == 4:
            out.append(dict(id=f"{e.shard_key}-{i}", shard=e.url, row_index=i, status="error", error_kind="decode"))
        else:
            out += [dict(id=f"{e.shard_key}-{i}", shard=e.url, row_index=i, method="m", token_index=t, status="ok",
                         map=[value, 1 - value], map_h=1, map_w=2) for t in (3, 4)]
    return out


def _write(run: RunDir, path: str, records: list[dict]) -> None:
    run.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with run.fs.open(path, "wb") as f:
        pq.write_table(records_table(records), f)


def _part(run, e, lo, hi, old_layout=False, value=0.5):
    folder = "results/_parts" if old_layout else "_staging/parts"
    _write(run, run.path(folder, part_name(e.shard_key, H, lo, hi)), _records(e, range(lo, hi + 1), value))


def _final_rows(run, e) -> list[int]:
    with run.fs.open(run.path("results", final_name(e.shard_key, H)), "rb") as f:
        return pq.read_table(f, columns=["row_index"]).column(0).to_pylist()


def test_compaction_refuses_parts_that_miss_rows_and_writes_nothing(run):
    e = _entry(0, 6)
    _part(run, e, 0, 2)
    with pytest.raises(ShardIncompleteError, match="3 of 6 input rows"):
        compact(run, e, H, parts_of(run, e, H))
    with pytest.raises(ShardIncompleteError, match="0 of 6 input rows"):
        compact(run, e, H, [])  # the parts were deleted under a driver (issue 18: an empty final file)
    assert not run.exists("results", final_name(e.shard_key, H))
    assert len(parts_of(run, e, H)) == 1  # nothing deleted either


def test_complete_final_file_is_never_replaced(run):
    e = _entry(0, 6)
    _part(run, e, 0, 5)
    compact(run, e, H, parts_of(run, e, H))
    final = run.path("results", final_name(e.shard_key, H))
    before = run.fs.cat_file(final)
    assert sorted(set(_final_rows(run, e))) == list(range(6))
    with pytest.raises(ShardIncompleteError):
        compact(run, e, H, [])  # a second driver compacting a shard whose parts are gone
    assert run.fs.cat_file(final) == before
    _part(run, e, 0, 2, value=0.9)  # a late driver's own complete set of parts (other bytes)
    _part(run, e, 3, 5, value=0.9)
    compact(run, e, H, parts_of(run, e, H))
    assert run.fs.cat_file(final) == before and parts_of(run, e, H) == []


def test_compaction_writes_nothing_into_results_but_the_final_file(run, monkeypatch):
    e = _entry(0, 4)
    _part(run, e, 0, 1)
    _part(run, e, 2, 3)
    opened, moved = [], []
    real_open, real_mv = run.fs.open, run.fs.mv
    monkeypatch.setattr(run.fs, "open", lambda p, mode="rb", **kw: (opened.append((p, mode)), real_open(p, mode, **kw))[1])
    monkeypatch.setattr(run.fs, "mv", lambda a, b, **kw: (moved.append(b), real_mv(a, b, **kw))[1])
    compact(run, e, H, parts_of(run, e, H))
    written = [p for p, mode in opened if "w" in mode]
    assert written and all("/_staging/tmp/" in p for p in written), written
    assert moved == [run.path("results", final_name(e.shard_key, H))]
    assert [p.rsplit("/", 1)[-1] for p in run.ls("results")] == [final_name(e.shard_key, H)]


def test_reconcile_rejects_a_short_final_file_and_accounts_exactly(run):
    a, b, c = _entry(0, 5), _entry(1, 5), _entry(2, 0)
    _write(run, run.path("results", final_name(a.shard_key, H)), _records(a, range(5)))
    _write(run, run.path("results", final_name(b.shard_key, H)), _records(b, range(2)))  # 2 of 5 rows
    logs = []
    rec = reconcile(run, [a, b, c], H, logs.append)
    assert [e.url for e in rec.complete] == [a.url, c.url] and [e.url for e in rec.pending] == [b.url]
    assert any("holds 2 of its 5 input rows" in m for m in logs), logs
    acct = rec.accounting.to_dict()
    assert (acct["expected_inputs"], acct["present_inputs"], acct["exact"]) == (10, 5, False)
    assert acct["short_shards"] == [dict(shard=b.url, expected=5, present=0)]
    assert not run.exists("results", final_name(b.shard_key, H)) and len(run.ls("_staging/rejected")) == 1
    _part(run, b, 0, 4)  # the shard processed again
    rec = reconcile(run, [a, b, c], H, logs.append)
    assert rec.pending == [] and rec.accounting.exact and rec.accounting.to_dict()["present_inputs"] == 10
    assert sorted(set(_final_rows(run, b))) == list(range(5)) and _final_rows(run, c) == []


def test_run_of_the_previous_layout_resumes(run):
    """Parts in results/_parts/ and a temporary file in results/ (a compaction under way when the
    old driver died): reconcile moves the parts to _staging/parts/ and compacts; results/ then
    holds only final files, so pandas/pyarrow/duckdb read exactly the results."""
    a, b = _entry(0, 4), _entry(1, 4)
    _part(run, a, 0, 3, old_layout=True)
    _part(run, b, 0, 1, old_layout=True)  # partial: processed again
    run.fs.pipe_file(run.path("results", final_name(a.shard_key, H) + ".tmp"), b"half a parquet file")
    rec = reconcile(run, [a, b], H, lambda m: None)
    assert [e.url for e in rec.complete] == [a.url] and [e.url for e in rec.pending] == [b.url]
    assert [p.rsplit("/", 1)[-1] for p in run.ls("results")] == [final_name(a.shard_key, H)]
    assert sorted(set(_final_rows(run, a))) == list(range(4)) and run.ls("_staging/parts") == []


def test_reconcile_lists_each_folder_once_whatever_the_number_of_shards(run, monkeypatch):
    # Regression (issue 17): reconcile listed _staging/parts once per shard and asked whether each
    # final file exists: a resumed 2,000-shard run on S3 made ~6,000 requests before doing anything.
    entries = [_entry(k, 3) for k in range(12)]
    for e in entries[:8]:  # complete: final files
        _part(run, e, 0, 2)
        compact(run, e, H, parts_of(run, e, H))
    for e in entries[8:10]:  # complete but not compacted: all rows in parts
        _part(run, e, 0, 1)
        _part(run, e, 2, 2)
    _part(run, entries[10], 0, 1)  # partial: deleted, pending
    _part(run, entries[0], 0, 2)  # a retried task's part after compaction: deleted
    listed, exists = [], []
    ls, sizes, fs_exists = RunDir.ls, RunDir.sizes, run.fs.exists
    monkeypatch.setattr(RunDir, "ls", lambda self, rel: listed.append(rel) or ls(self, rel))
    monkeypatch.setattr(RunDir, "sizes", lambda self, rel: listed.append(rel) or sizes(self, rel))
    monkeypatch.setattr(run.fs, "exists", lambda p, **kw: exists.append(p) or fs_exists(p, **kw))
    rec = reconcile(run, entries, H, log=lambda m: None)
    # per reconcile, not per shard: parts once, results/ twice (the old-layout check has its own)
    assert listed.count("_staging/parts") == 1 and listed.count("results") == 2
    assert [e.shard_key for e in rec.pending] == [entries[10].shard_key, entries[11].shard_key]
    assert rec.changed  # two shards compacted here
    assert len(rec.complete) == 10 and sum(rec.accounting.present.values()) == 30
    assert not run.ls("_staging/parts")
    assert sorted(set(_final_rows(run, entries[9]))) == [0, 1, 2]
    finals_checked = [p for p in exists if p.rsplit("/", 1)[-1].startswith("shard-") and "/results/" in p]
    assert len(finals_checked) <= 2  # only for the two shards compacted here (compact checks its own final)


def test_a_finished_run_reconciles_unchanged(run):
    entries = [_entry(k, 3) for k in range(3)]
    for e in entries:
        _part(run, e, 0, 2)
        compact(run, e, H, parts_of(run, e, H))
    rec = reconcile(run, entries, H, log=lambda m: None)
    assert not rec.pending and not rec.changed and len(rec.complete) == 3
