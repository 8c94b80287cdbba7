"""Issue 18 item 1 at job level: two drivers on one output directory, local disk and S3 (moto on
127.0.0.1). Driver A runs in a thread and is held after its first output batch (its Ray execution
keeps streaming in the background); driver B runs the identical command meanwhile.

Before the output lease, B reconciled A's part files away and A then compacted empty tables over
B's final files: both exited 0 with `_SUCCESS` while rows were missing. Now B refuses while A's
lease is live, a stale lease is taken over, a driver whose lease was taken over stops writing, and
`_SUCCESS` is written only when every input row of every shard is in a final file."""
from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
from jobutil import FAST, _results, _run

from dcam.actors import scenes
from dcam.pipeline import job
from dcam.pipeline.manifest import RunDir
from dcam.pipeline.synth import write_corpus

pytestmark = pytest.mark.slow

N, SHARD = 24, 4
# Both drivers' actor pools must fit on the 2-CPU test cluster at once (one logical GPU only).
TWO_DRIVERS = [*FAST, "actors.num_gpus=0", "actors.num_cpus=0.25", "probe.batch_size=4"]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(output URL, storage overrides, storage_options) on local disk or on the loopback S3."""
    if request.param == "local":
        return str(tmp_path / "out"), [], {}
    bucket = request.getfixturevalue("s3_bucket")
    so = bucket.storage_options
    return f"{bucket.url}/out", [f"storage.{k}={so[k]}" for k in ("endpoint_url", "key", "secret", "region")], so


class HeldDriver:
    """Runs driver A in a thread; its batch iterator stops after the first batch until released."""

    def __init__(self, monkeypatch, overrides):
        self.paused, self.released = threading.Event(), threading.Event()
        self.result, self.error, self.logs, self.batches = None, None, [], []
        real = job.build_dataset

        def build(*args, **kwargs):
            ds = real(*args, **kwargs)
            return _Held(ds, self) if threading.current_thread().name == "driver-A" else ds

        monkeypatch.setattr(job, "build_dataset", build)
        self.thread = threading.Thread(target=self._main, args=(overrides,), name="driver-A", daemon=True)
        self.thread.start()

    def _main(self, overrides):
        try:
            self.result = _run(overrides, log=self.logs.append)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e
        finally:
            self.paused.set()

    def wait_paused(self, url, so):
        """Until A is held after its first batch, that batch's shard is compacted and A's Ray
        execution (which streams on in the background) has written every other row as parts."""
        assert self.paused.wait(300), "driver A never produced a batch"
        deadline = time.monotonic() + 300
        while _rows_on_storage(url, so) != N and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.2)
        assert self.thread.is_alive(), f"driver A ended before it was held: {self.error!r} {self.logs[-5:]}"
        assert _rows_on_storage(url, so) == N, "driver A's execution did not write every row"

    def finish(self):
        self.released.set()
        self.thread.join(300)
        assert not self.thread.is_alive(), "driver A did not finish"


class _Held:
    def __init__(self, ds, driver: HeldDriver):
        self.ds, self.driver = ds, driver

    def iter_batches(self, **kwargs):
        for i, batch in enumerate(self.ds.iter_batches(**kwargs)):
            self.driver.batches.append(sorted(set(batch["shard"].tolist())))
            yield batch
            if i == 0:
                self.driver.paused.set()
                assert self.driver.released.wait(300)


def _rows_on_storage(url, so) -> int:
    """Input rows held by final files plus part files (either layout); -1 while a shard has both
    (its compaction is under way)."""
    run = RunDir(url, so)
    run.fs.invalidate_cache()  # s3fs caches listings; the writers are other processes
    if not run.exists("manifest.json"):
        return 0
    rows = {e["shard_key"]: e["rows"] for e in json.loads(run.read_text("manifest.json"))["shards"]}
    key = {name: next(k for k in rows if name.startswith(k + ".")) for d in ("results", "results/_parts",
           "_staging/parts") for name in (p.rsplit("/", 1)[-1] for p in run.ls(d)) if name.endswith(".parquet")}
    finals = {key[n] for n in key if "-" not in n[len(key[n]):]}
    parts = [n for n in key if "-" in n[len(key[n]):]]
    if finals & {key[n] for n in parts}:
        return -1
    total = sum(rows[k] for k in finals)
    for n in parts:
        lo, hi = n[len(key[n]):].split(".")[2].split("-")
        total += int(hi) - int(lo) + 1
    return total


def _assert_every_row_in_final_files(url, so):
    """No input row lost: each shard's final file holds exactly its manifest rows."""
    run = RunDir(url, so)
    manifest = json.loads(run.read_text("manifest.json"))
    for e in manifest["shards"]:
        finals = [p for p in run.ls("results") if p.rsplit("/", 1)[-1].startswith(e["shard_key"] + ".")]
        assert len(finals) == 1, (e["shard_key"], run.ls("results"))
        with run.fs.open(finals[0], "rb") as f:
            rows = set(pq.read_table(f, columns=["row_index"]).column(0).to_pylist())
        assert rows == set(range(e["rows"])), (finals[0], sorted(rows), e["rows"])
    t = _results(url, so)
    assert len(set(t["id"].to_pylist())) == N
    success = json.loads(run.read_text("_SUCCESS"))
    assert success["expected_inputs"] == success["present_inputs"] == N, success
    summary = json.loads(run.read_text("summary.json"))
    assert summary["accounting"]["expected_inputs"] == summary["accounting"]["present_inputs"] == N


def test_second_driver_refuses_while_the_first_holds_the_output(ray_local, tmp_path, random_ckpt, output,
                                                                 monkeypatch):
    url, storage, so = output
    write_corpus(str(tmp_path / "in"), N, 1180, SHARD, scenes.SceneConfig())
    same = [f"input={tmp_path / 'in'}", f"output={url}", f"model.source={random_ckpt}", *TWO_DRIVERS, *storage]
    a = HeldDriver(monkeypatch, same)
    a.wait_paused(url, so)
    second_error = None
    try:
        _run(same)  # the identical command, e.g. a resubmit while the first job still runs
    except Exception as e:  # noqa: BLE001 - inspected below, after the data
        second_error = e
    a.finish()
    print("driver A's batches (shards):", [len(b) for b in a.batches], "second driver:", repr(second_error))
    assert a.error is None, repr(a.error)
    _assert_every_row_in_final_files(url, so)
    assert a.result["inputs"] == N and a.result["ok"] == N
    from dcam.pipeline.lease import LeaseHeldError

    assert isinstance(second_error, LeaseHeldError), repr(second_error)
    msg = str(second_error)
    assert "\n" not in msg and "in use by" in msg and "expires" in msg and "_lease.json" in msg, msg
    doc = json.loads(RunDir(url, so).read_text("_lease.json"))
    assert doc["run_id"] in msg and doc["state"] == "released", doc  # names the owner; A released it


def test_stale_lease_is_taken_over_and_the_fenced_driver_stops_writing(ray_local, tmp_path, random_ckpt, output,
                                                                       monkeypatch):
    """A's lease goes stale while A still runs (e.g. a long pause): B takes it over and finishes;
    A notices at its next heartbeat or final write and stops without touching B's results."""
    from dcam.pipeline import lease as lease_mod

    url, storage, so = output
    write_corpus(str(tmp_path / "in"), N, 1181, SHARD, scenes.SceneConfig())
    same = [f"input={tmp_path / 'in'}", f"output={url}", f"model.source={random_ckpt}", *TWO_DRIVERS, *storage,
            "lease.heartbeat_s=0.2"]
    a = HeldDriver(monkeypatch, same)
    a.wait_paused(url, so)
    store = lease_mod.store_for(RunDir(url, so))
    for _ in range(100):  # what A's lease looks like to B once A's heartbeat stopped for longer than the TTL
        doc, token = store.read()
        assert doc["state"] == "held"
        stale = {**doc, "run_id": "stale-owner", "host": "elsewhere", "expires": doc["heartbeat"] - 1.0}
        if store.replace(stale, token) is not None:
            break  # (else A's heartbeat renewed in between: read again)
    else:
        pytest.fail("could not replace A's lease")
    logs = []
    b = _run(same, log=logs.append)
    assert any("taking over" in m and "stale-owner" in m for m in logs), logs
    assert b["inputs"] == N
    a.finish()
    assert isinstance(a.error, lease_mod.LeaseLostError), repr(a.error)
    _assert_every_row_in_final_files(url, so)
