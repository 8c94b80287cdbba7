"""The output lease (issue 18 item 1) on local disk and on S3 (moto on 127.0.0.1, which implements
PutObject If-None-Match / If-Match): one holder, a clear refusal, takeover of stale leases only,
compare-and-swap races, the heartbeat noticing a takeover, release on every exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dcam.pipeline.layout import RunDir
from dcam.pipeline.lease import LeaseHeldError, LeaseLostError, OutputLease, S3Store, owner_gone, store_for


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"), {})
    bucket = request.getfixturevalue("s3_bucket")
    return RunDir(f"{bucket.url}/run", bucket.storage_options)


def _lease(run, logs=None, **kw):
    return OutputLease(run, log=(logs.append if logs is not None else lambda m: None), **kw)


def _plant(run, **changes) -> dict:
    """Rewrite the stored lease (compare-and-swap) with `changes`; returns the new document."""
    store = store_for(run)
    doc, token = store.read()
    doc = {**doc, **changes}
    assert store.replace(doc, token) is not None
    return doc


def test_second_driver_is_refused_with_one_line_naming_the_owner(run):
    a = _lease(run).acquire()
    with pytest.raises(LeaseHeldError) as ei:
        _lease(run).acquire()
    msg = str(ei.value)
    assert "\n" not in msg and a.run_id in msg and f"pid {os.getpid()}" in msg and "expires at" in msg, msg
    assert f"{run.url}/_lease.json" in msg and "in use by" in msg
    doc, _ = store_for(run).read()
    assert doc["run_id"] == a.run_id and doc["state"] == "held" and doc["expires"] > doc["heartbeat"]


def test_released_lease_is_taken_silently_and_a_stale_one_with_a_log_line(run):
    a = _lease(run).acquire()
    a.release()
    assert store_for(run).read()[0]["state"] == "released"
    logs = []
    b = _lease(run, logs).acquire()
    assert logs == [] and store_for(run).read()[0]["run_id"] == b.run_id
    _plant(run, run_id="old-run", host="another-host", expires=time.time() - 5)  # B stopped renewing long ago
    c = _lease(run, logs).acquire()
    assert len(logs) == 1 and "taking over" in logs[0] and "old-run" in logs[0] and "expired" in logs[0], logs
    assert store_for(run).read()[0]["run_id"] == c.run_id


def test_driver_whose_lease_was_taken_over_is_fenced(run):
    a = _lease(run).acquire()
    _plant(run, expires=time.time() - 1)  # A's heartbeat stalled past the TTL ...
    b = _lease(run).acquire()  # ... and B took over
    with pytest.raises(LeaseLostError) as ei:
        a.fence("writing the final file of shard X")
    assert b.run_id in str(ei.value) and "writing the final file of shard X" in str(ei.value)
    with pytest.raises(LeaseLostError):
        a.check()
    a.release()  # must not clobber B's lease
    doc, _ = store_for(run).read()
    assert doc["run_id"] == b.run_id and doc["state"] == "held"


def test_fence_renews_a_live_lease(run):
    a = _lease(run, ttl_s=60, heartbeat_s=10).acquire()
    before = store_for(run).read()[0]
    a.fence("writing _SUCCESS")
    after = store_for(run).read()[0]
    assert after["run_id"] == a.run_id and after["heartbeat"] >= before["heartbeat"]
    assert after["expires"] == pytest.approx(after["heartbeat"] + 60)


def test_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(run):
    a = _lease(run).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    doc = _plant(run, pid=int(dead.stdout), proc={**a._doc(time.time())["proc"], "start": 1},
                 expires=time.time() + 3600)
    assert owner_gone(doc)
    logs = []
    _lease(run, logs).acquire()
    assert "process is gone" in logs[0], logs


def test_live_process_elsewhere_or_here_is_never_declared_gone(run):
    a = _lease(run).acquire()
    doc = store_for(run).read()[0]
    assert not owner_gone(doc)  # this very process
    assert not owner_gone({**doc, "host": "another-host", "pid": 999999999})  # unknown machine: wait for expiry
    assert not owner_gone({**doc, "proc": {**doc["proc"], "pid_ns": "pid:[1]"}, "pid": 999999999})
    with pytest.raises(LeaseHeldError):
        _lease(run).acquire()
    a.release()


def test_only_one_of_many_simultaneous_drivers_gets_the_lease(run):
    for stale in (False, True):  # an empty output, then a stale lease that everybody tries to take over
        if stale:
            _plant(run, run_id="crashed", host="another-host", expires=time.time() - 10)
        won, refused, start = [], [], threading.Barrier(6)

        def contend():
            lease = _lease(run)
            start.wait()
            try:
                won.append(lease.acquire())
            except LeaseHeldError as e:
                refused.append(e)

        threads = [threading.Thread(target=contend) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        assert store_for(run).read()[0]["run_id"] == won[0].run_id


def test_heartbeat_renews_and_notices_a_takeover(run):
    logs = []
    a = _lease(run, logs, ttl_s=30, heartbeat_s=0.05)
    with a:
        first = store_for(run).read()[0]["heartbeat"]
        _wait(lambda: store_for(run).read()[0]["heartbeat"] > first, "the heartbeat never renewed the lease")
        store = store_for(run)
        for _ in range(100):
            doc, token = store.read()
            if store.replace({**doc, "run_id": "intruder"}, token) is not None:
                break
        _wait(lambda: a.lost is not None, "the heartbeat never noticed the takeover")
        with pytest.raises(LeaseLostError) as ei:
            a.check()
        assert "intruder" in str(ei.value) and any("LEASE LOST" in m for m in logs)
    assert store_for(run).read()[0]["run_id"] == "intruder"  # release left the new owner's lease alone


def test_heartbeat_that_cannot_reach_storage_gives_the_lease_up_at_expiry(tmp_path, monkeypatch):
    logs = []
    lease = OutputLease(RunDir(str(tmp_path / "run"), {}), ttl_s=0.4, heartbeat_s=0.1, log=logs.append)
    with lease:
        def unreachable(doc, token):
            raise ConnectionError("endpoint unreachable")

        monkeypatch.setattr(lease.store, "replace", unreachable)
        _wait(lambda: lease.lost is not None, "the lease was never given up")
        with pytest.raises(LeaseLostError, match="could not renew it before it expired.*endpoint unreachable"):
            lease.check()
    assert not lease._thread.is_alive()


def test_lease_is_released_when_the_job_raises(run):
    with pytest.raises(KeyboardInterrupt):
        with _lease(run):
            raise KeyboardInterrupt
    assert store_for(run).read()[0]["state"] == "released"


def test_bad_timings_and_advisory_storage_are_reported(tmp_path):
    with pytest.raises(ValueError, match="at most half"):
        OutputLease(RunDir(str(tmp_path), {}), ttl_s=10, heartbeat_s=6)
    logs = []
    OutputLease(RunDir(f"memory://{tmp_path.name}/run", {}), log=logs.append).acquire()
    assert any("advisory" in m for m in logs), logs


def test_s3_endpoint_that_ignores_conditional_writes_is_reported(s3_bucket, monkeypatch):
    run = RunDir(f"{s3_bucket.url}/run", s3_bucket.storage_options)
    monkeypatch.setattr(S3Store, "honours_conditions", lambda self, doc: False)
    logs = []
    OutputLease(run, log=logs.append).acquire()
    assert any("does not support conditional writes" in m for m in logs), logs
    assert json.loads(run.read_text("_lease.json"))["state"] == "held"


def _wait(cond, message, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_dcam_run_refuses_a_held_output_with_exit_4_and_one_line(tmp_path, capsys):
    from dcam.actors import scenes
    from dcam.pipeline.cli import main
    from dcam.pipeline.synth import write_corpus

    write_corpus(str(tmp_path / "in"), 2, 1200, 2, scenes.SceneConfig())  # an input that lists: the lease refuses
    holder = _lease(RunDir(str(tmp_path / "out"), {})).acquire()
    code = main(["run", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and err[0].startswith("dcam run: output ") and holder.run_id in err[0], err
    holder.release()
