"""Issue 7, unit level (no Ray, fast): transient storage errors while reading input shards
(`pipeline.stages.read_rows`) and while writing part files (`pipeline.sinks.WriteStage`).

Faults are injected with in-memory filesystems: `FaultFS` (below; protocol "faultfs://") fails
`open` a set number of times per mode, or breaks a reader after a set number of read calls; the
`flaky` fixture's FlakyFS (tests/pipeline/badinput.py) fails `cat_file`. Retry delays are tiny
(storage.retry_base_delay) and every call runs under a wall-clock guard, so a retry loop that
never ends fails the test instead of hanging it.
"""
from __future__ import annotations

import io
import json
import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from badinput import FLAKY_SECRET, FlakyFS, flaky  # noqa: F401 - fixture
from fsspec.implementations.memory import MemoryFileSystem

from dcam.pipeline.sinks import WriteStage, part_name
from dcam.pipeline.sources import make_shard_key
from dcam.pipeline.stages import read_rows
from dcam.pipeline.storage import RetriesExhaustedError

SECRET = "dcamSECRET-faults-" + uuid.uuid4().hex  # planted in the storage options; must never surface
ATTEMPTS = 3
GUARD_S = 30.0  # a bounded retry loop with 1 ms delays finishes in well under a second


class FaultFS(MemoryFileSystem):
    """Memory filesystem with injectable transient faults (state is class-level: fsspec caches instances).

    fail[mode]   remaining `open` calls ("rb" / "wb") that raise ConnectionError before opens work again
    opens[mode]  `open` calls seen
    reads_ok     when not None: each file opened for reading raises ConnectionError on its read call
                 number reads_ok + 1 (a connection lost mid-stream, after the open succeeded)
    """
    protocol = "faultfs"
    fail = {"rb": 0, "wb": 0}
    opens = {"rb": 0, "wb": 0}
    reads_ok: int | None = None
    message = "connection reset by peer"

    @classmethod
    def reset(cls):
        cls.fail, cls.opens, cls.reads_ok = {"rb": 0, "wb": 0}, {"rb": 0, "wb": 0}, None
        cls.message = "connection reset by peer"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("faultfs://"))

    def _open(self, path, mode="rb", **kw):
        key = "wb" if ("w" in mode or "x" in mode) else "rb"
        FaultFS.opens[key] += 1
        if FaultFS.fail[key] > 0:
            FaultFS.fail[key] -= 1
            raise ConnectionError(FaultFS.message)
        f = super()._open(path, mode, **kw)
        if key == "rb" and FaultFS.reads_ok is not None:
            return _BreakingReader(f.getvalue(), FaultFS.reads_ok)
        return f


class _BreakingReader(io.RawIOBase):
    """A raw readable stream that loses its connection after `ok` successful reads."""

    def __init__(self, data: bytes, ok: int):
        super().__init__()
        self._buf = io.BytesIO(data)
        self.left = ok

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._buf.seek(pos, whence)

    def tell(self):
        return self._buf.tell()

    def readinto(self, b):
        if self.left <= 0:
            raise ConnectionError("connection reset by peer (mid-stream)")
        self.left -= 1
        return self._buf.readinto(b)


@pytest.fixture
def faultfs():
    """Register faultfs://, reset its state; yields (storage options, a fresh root URL). Cleans up."""
    fsspec.register_implementation("faultfs", FaultFS, clobber=True)
    FaultFS.reset()
    root = f"/dcam-faults-{uuid.uuid4().hex[:8]}"
    opts = {"allowed_schemes": ["faultfs", "memory"], "retry_attempts": ATTEMPTS, "retry_base_delay": 0.001,
            "secret": SECRET}
    yield opts, f"faultfs://{root}"
    FaultFS.reset()
    fs = MemoryFileSystem()
    if fs.exists(root):
        fs.rm(root, recursive=True)


def guarded(fn, timeout: float = GUARD_S):
    """fn() in a worker thread; fail (never hang) if it does not finish within `timeout` seconds."""
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    try:
        return fut.result(timeout=timeout)
    except FutureTimeout:
        pytest.fail(f"did not finish within {timeout}s: an unbounded retry loop?")
    finally:
        pool.shutdown(wait=False)


def write_shard(url: str, n: int) -> dict:
    """A dcam-format parquet shard of n image_uri rows (read_rows never fetches images); returns the
    work item read_rows gets from the manifest."""
    table = pa.table({"id": [f"r{i}" for i in range(n)], "image_uri": [f"memory:///img/{i}.png" for i in range(n)],
                      "prompt": ["describe the image"] * n})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    MemoryFileSystem().pipe_file(url.split("://", 1)[1], buf.getvalue())
    return dict(url=url, format="parquet", shard_key=make_shard_key(url), rows=n)


# ----------------------------------------------------------------------------------------------- reads

def test_read_rows_transient_open_errors_then_success_yields_every_row_ok(faultfs):
    opts, root = faultfs
    item = write_shard(f"{root}/in/shard.parquet", 7)
    FaultFS.fail["rb"] = ATTEMPTS - 1  # fails twice, the third (last allowed) attempt works
    rows = guarded(lambda: list(read_rows(item, opts, {})))
    assert [r["row_index"] for r in rows] == list(range(7))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(7)]
    assert all(r["status"] == "ok" and r["error"] is None for r in rows)
    assert FaultFS.opens["rb"] == ATTEMPTS


def test_read_rows_persistent_failure_gives_an_error_row_per_manifest_row_quickly(faultfs):
    opts, root = faultfs
    item = write_shard(f"{root}/in/shard.parquet", 5)
    FaultFS.fail["rb"] = 10 ** 6  # never recovers
    FaultFS.message = f"connection reset while sending credentials {SECRET}"
    rows = guarded(lambda: list(read_rows(item, opts, {})))  # guarded: fails instead of hanging
    assert FaultFS.opens["rb"] == ATTEMPTS  # bounded: exactly retry_attempts tries, then give up
    assert [r["row_index"] for r in rows] == list(range(item["rows"]))  # one row per manifest row
    assert [r["id"] for r in rows] == [f"{item['shard_key']}-{k}" for k in range(item["rows"])]
    for r in rows:
        assert r["status"] == "error" and r["error_kind"] == "shard_read" and r["shard"] == item["url"]
        assert "shard read failed after 0 rows" in r["error"] and f"gave up after {ATTEMPTS} attempts" in r["error"]
        assert SECRET not in r["error"] and "***" in r["error"]
        assert r["image"] is None and r["mask"] is None


def test_read_rows_connection_lost_mid_shard_keeps_rows_read_and_fills_the_rest(faultfs):
    """The open succeeds but the stream breaks part-way (a JSON Lines shard read in 1 MiB chunks):
    rows already read stay ok, every remaining manifest row becomes a shard_read error row."""
    opts, root = faultfs
    n, pad = 400, "x" * 8000  # ~3.2 MB: several buffered reads
    lines = [json.dumps({"id": f"r{i}", "image_uri": f"memory:///img/{i}.png", "prompt": "describe", "pad": pad})
             for i in range(n)]
    url = f"{root}/in/shard.jsonl"
    MemoryFileSystem().pipe_file(url.split("://", 1)[1], "\n".join(lines).encode())
    item = dict(url=url, format="jsonl", shard_key=make_shard_key(url), rows=n)
    FaultFS.reads_ok = 2  # two chunks arrive, then the connection drops
    rows = guarded(lambda: list(read_rows(item, opts, {})))
    assert FaultFS.opens["rb"] == 1  # the open worked; a mid-stream failure is not an open retry
    assert [r["row_index"] for r in rows] == list(range(n))
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert 0 < len(ok) < n, len(ok)  # the fault really hit mid-stream
    assert [r["id"] for r in ok] == [f"r{i}" for i in range(len(ok))]  # an ok prefix, then errors
    assert [r["id"] for r in bad] == [f"{item['shard_key']}-{k}" for k in range(len(ok), n)]
    assert all(r["error_kind"] == "shard_read" and f"after {len(ok)} rows" in r["error"] for r in bad)


def test_read_rows_on_flaky_cat_file(flaky):
    """The `flaky` fixture's FlakyFS fails cat_file (COCO shards are read whole with cat_file)."""
    doc = {"images": [{"id": k, "file_name": f"{k}.png", "height": 2, "width": 2} for k in range(1, 4)],
           "annotations": [], "categories": []}
    FlakyFS().pipe_file("/dcam/faults-instances.json", json.dumps(doc).encode())
    url = "flaky:///dcam/faults-instances.json"
    item = dict(url=url, format="coco", shard_key=make_shard_key(url), rows=3)
    FlakyFS.fail = flaky["retry_attempts"] - 1
    rows = guarded(lambda: list(read_rows(item, flaky, {})))
    assert [r["id"] for r in rows] == ["1", "2", "3"] and all(r["status"] == "ok" for r in rows)
    FlakyFS.fail, FlakyFS.calls, FlakyFS.message = 10 ** 6, 0, f"reset while sending {FLAKY_SECRET}"
    rows = guarded(lambda: list(read_rows(item, flaky, {})))
    assert FlakyFS.calls == flaky["retry_attempts"]
    assert [r["error_kind"] for r in rows] == ["shard_read"] * 3
    assert all(FLAKY_SECRET not in r["error"] for r in rows)
    FlakyFS.fail = 0
    FlakyFS().rm("/dcam/faults-instances.json")


# ----------------------------------------------------------------------------------------------- writes

def _batch(shard_url: str, row_indexes: list[int]) -> dict[str, np.ndarray]:
    """What RefineScoreStage hands the sink: one row per input row, its output records pickled."""
    recs = [pickle.dumps([dict(id=f"r{i}", shard=shard_url, row_index=i, method="diffusion_cam", token="red",
                               token_index=0, status="ok", map=[0.5, 0.25], map_h=1, map_w=2, notes="")])
            for i in row_indexes]
    n = len(row_indexes)
    return {"id": np.array([f"r{i}" for i in row_indexes], dtype=object),
            "shard": np.array([shard_url] * n, dtype=object), "row_index": np.array(row_indexes, dtype=np.int64),
            "status": np.array(["ok"] * n, dtype=object), "error": np.array([None] * n, dtype=object),
            "error_kind": np.array([None] * n, dtype=object), "records": np.array(recs, dtype=object),
            "refine_ms": np.full(n, 1.5)}


def _parts(run_url: str) -> list[str]:
    fs = MemoryFileSystem()
    p = run_url.split("://", 1)[1] + "/_staging/parts"  # never under results/ (issue 18)
    return sorted(fs.ls(p, detail=False)) if fs.exists(p) else []


def test_write_stage_retries_transient_errors_and_writes_the_part_once(faultfs):
    opts, root = faultfs
    shard = "s3://bucket/in/shard-0.parquet"
    stage = WriteStage(f"{root}/run", "cfghash00001", {shard: "shard-0-abc"}, opts)
    FaultFS.fail["wb"] = 2  # ConnectionError twice, then the write goes through
    out = guarded(lambda: stage(_batch(shard, [3, 4, 5])))
    assert FaultFS.opens["wb"] == 3
    parts = _parts(f"{root}/run")
    assert [p.rsplit("/", 1)[-1] for p in parts] == [part_name("shard-0-abc", "cfghash00001", 3, 5)]
    t = pq.read_table(io.BytesIO(MemoryFileSystem().cat_file(parts[0])))
    assert t["row_index"].to_pylist() == [3, 4, 5] and t["refine_ms"].to_pylist() == [1.5] * 3
    assert out["inputs"].tolist() == [3] and out["ok"].tolist() == [3] and list(out["shard"]) == [shard]


def test_write_stage_persistent_failure_raises_retries_exhausted(faultfs):
    """A write that keeps failing raises RetriesExhaustedError after `retry_attempts` tries.

    This is the intended behaviour: the exception fails the Ray task that runs the WriteStage, Ray
    retries the task, and if it keeps failing the job fails loudly (no _SUCCESS, the shard stays
    pending for a rerun). A lost write must never be silent: the stage does not swallow the error,
    does not report the rows as written, and leaves no part file behind.
    """
    opts, root = faultfs
    shard = "s3://bucket/in/shard-0.parquet"
    stage = WriteStage(f"{root}/run", "cfghash00001", {shard: "shard-0-abc"}, opts)
    FaultFS.fail["wb"] = 10 ** 6
    FaultFS.message = f"connection reset (auth {SECRET})"
    with pytest.raises(RetriesExhaustedError) as ei:
        guarded(lambda: stage(_batch(shard, [0, 1])))
    assert ei.value.attempts == ATTEMPTS and FaultFS.opens["wb"] == ATTEMPTS
    assert f"gave up after {ATTEMPTS} attempts" in str(ei.value) and SECRET not in str(ei.value)
    assert _parts(f"{root}/run") == []


def test_write_stage_non_transient_error_is_not_retried(faultfs, monkeypatch):
    """Access denied is not transient: one attempt, raised unchanged (still loud)."""
    opts, root = faultfs
    shard = "s3://bucket/in/shard-0.parquet"
    stage = WriteStage(f"{root}/run", "cfghash00001", {shard: "shard-0-abc"}, opts)
    calls = []

    def denied(self, path, mode="rb", **kw):
        calls.append(mode)
        raise PermissionError("Access Denied")

    monkeypatch.setattr(FaultFS, "_open", denied)
    with pytest.raises(PermissionError):
        guarded(lambda: stage(_batch(shard, [0])))
    assert calls == ["wb"]


def test_probe_threads_auto_shares_local_cores_and_defers_to_the_actor_on_a_cluster(monkeypatch):
    # Regression: Ray pins a fractional-CPU actor to one OpenMP thread, so on a local CPU machine
    # the probe used 1 of 2 cores (dcam bench: pipeline 0.67x the in-process loop).
    import os

    from dcam.pipeline.job import probe_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    d = {"probe": {"threads": "auto"}, "actors": {"pool_max": 2}}
    assert probe_threads(d, may_grow=False) == 4
    assert probe_threads(d, may_grow=True) == "auto"  # sized by each actor on its node (test_node_threads.py)
    assert probe_threads({"probe": {"threads": 3}, "actors": {"pool_max": 2}}, may_grow=True) == 3
    assert probe_threads({"probe": {"threads": None}, "actors": {"pool_max": 2}}, may_grow=False) is None
    assert probe_threads({"probe": {"threads": "auto"}, "actors": {"pool_max": 16}}, may_grow=False) == 1


def test_preinitialised_ray_may_grow_unless_this_process_started_it(monkeypatch):
    # Regression: any pre-initialised Ray counted as a fixed local cluster, so an application
    # that connected to an autoscaling cluster itself and then ran the job was refused at once.
    import types

    import ray
    import ray._private.worker as ray_worker

    from dcam.pipeline.job import ensure_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for node, may_grow in ((types.SimpleNamespace(head=True), False), (types.SimpleNamespace(head=False), True),
                           (None, True)):
        monkeypatch.setattr(ray_worker, "_global_node", node, raising=False)
        assert ensure_ray({"ray": {}}) is may_grow
