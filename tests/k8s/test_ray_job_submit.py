"""Issue 8 acceptance, end to end: `ray job submit` runs `dcam run` on a local Ray head.

The head is started by this test (`ray start --head --block`, ray[default] for the Jobs API,
token auth as Ray >= 2.59 enables it for local clusters) in its own temp dir, on its own free
loopback ports, with a fresh token and a private HOME: it neither sees nor disturbs the session's
`ray_local` cluster, another test's cluster or the user's ~/.ray/auth_token. The job's entrypoint
runs on the head (this machine), so local paths work; the job supervisor sets RAY_ADDRESS to this
head's GCS for the driver, which `dcam run` connects to with plain `ray.init(address=...)`.
Teardown signals only the process ids this head started (see raycluster_proc.py); never `ray stop`.
The model is an untrained tiny checkpoint written by the test (`model.source=`), as in
tests/pipeline/test_job.py: the job's wiring does not depend on the shipped weights or map quality.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
N_SCENES, SHARD_SIZE = 16, 8
JOB_TIMEOUT_S = 480
DCAM_ARGS = ["report.enabled=false", "probe.faithfulness_steps=2", "probe.batch_size=8", "ray.progress_bars=false"]


def _load_helper():
    spec = importlib.util.spec_from_file_location("dcam_raycluster_proc", HERE / "raycluster_proc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _untrained_checkpoint(d: Path) -> str:
    import torch

    from dcam.actors.models.tiny_dmllm import TinyDMLLM, TinyDMLLMConfig, WordTokenizer

    torch.manual_seed(0)
    cfg = TinyDMLLMConfig()
    TinyDMLLM(cfg).save_pretrained(d)
    WordTokenizer(cfg.vocab).save_pretrained(str(d))
    return str(d)


def _jobs_cli_available() -> bool:
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard.modules.job.cli  # noqa: F401  (ray[default] only)
    except ImportError:
        return False
    return True


@pytest.fixture
def ray_head():
    if not _jobs_cli_available():
        pytest.fail("`ray job submit` needs the Jobs API: pip install 'ray[default]>=2.60,<2.61' (test extra)")
    rp = _load_helper()
    # A short root: Ray puts unix sockets under --temp-dir (paths are limited to ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="dcam-rj-", dir="/tmp"))
    head = rp.LocalRayHead(root, num_cpus=2, num_gpus=0, object_store_memory=500_000_000)
    try:
        head.start()
        yield head
    finally:
        survivors = head.stop()
        print(f"\n[ray head] stopped {len(head.tracked_pids)} tracked processes: {head.tracked_pids}")
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes of the test's Ray head survived teardown: {survivors}"


def test_ray_job_submit_runs_dcam_and_succeeds(ray_head, tmp_path):
    import pyarrow.dataset as pads

    t0 = time.monotonic()
    # The corpus is written while the head boots (both are mostly waiting on imports).
    inp, out = tmp_path / "in", tmp_path / "out"
    synth = subprocess.run([shutil.which("dcam", path=ray_head.env["PATH"]) or "dcam", "synth", f"output={inp}",
                            f"n={N_SCENES}", f"shard_size={SHARD_SIZE}"], env=ray_head.env, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert synth.returncode == 0, synth.stderr[-3000:]
    ckpt = _untrained_checkpoint(tmp_path / "ckpt")
    ids_in = pads.dataset(str(inp), format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids_in) == N_SCENES == len(set(ids_in))

    ray_head.wait_ready(timeout=240)
    t_ready = time.monotonic()
    # Token auth is really enforced on this head: the Jobs API refuses a request without the token.
    status, _ = ray_head.http("GET", "/api/jobs/", auth=False)
    assert status == 401, f"expected 401 Unauthorized without the token, got HTTP {status}"

    sid = f"dcam-e2e-{uuid.uuid4().hex[:12]}"
    entrypoint = ["dcam", "run", f"input={inp}", f"output={out}", f"model.source={ckpt}", *DCAM_ARGS]
    submit = ray_head.cli("job", "submit", "--address", ray_head.dashboard_url, "--submission-id", sid,
                          "--no-wait", "--", *entrypoint, timeout=240)
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}"

    info = ray_head.wait_job(sid, timeout=JOB_TIMEOUT_S)
    logs = ray_head.job_logs(sid)
    t_done = time.monotonic()
    assert info["status"] == "SUCCEEDED", (f"job {sid} ended {info['status']}: {info.get('message')}\n"
                                           f"entrypoint: {shlex.join(entrypoint)}\n--- job logs ---\n{logs[-8000:]}")
    # The driver registered with *this* head's GCS (the supervisor gave it RAY_ADDRESS of this head).
    assert info.get("driver_info"), f"no driver registered with the test's head: {info}"

    # The `ray job` CLI reads the same status with the token from the environment.
    st = ray_head.cli("job", "status", "--address", ray_head.dashboard_url, sid, timeout=180)
    assert st.returncode == 0 and f"job '{sid}' succeeded" in (st.stdout + st.stderr).lower(), \
        st.stdout[-2000:] + st.stderr[-2000:]

    # Every input id has result rows; the run is marked complete.
    assert (out / "_SUCCESS").exists(), sorted(p.name for p in out.iterdir())
    t = pads.dataset(str(out / "results"), format="parquet").to_table(columns=["id", "status"])
    assert t.num_rows >= N_SCENES
    assert sorted(set(t["id"].to_pylist())) == sorted(ids_in)
    summary = json.loads((out / "summary.json").read_text())  # per input row: ok or error by reason
    assert summary["inputs"] == N_SCENES, summary
    assert (summary["ok"], summary["errors"]) == (N_SCENES, {}), (
        f"job SUCCEEDED but not every input row is ok: {summary}; first errors: "
        f"{sorted(set(pads.dataset(str(out / 'results'), format='parquet').to_table(columns=['error'])['error'].to_pylist()), key=str)[:3]}")
    print(f"\n[ray job submit] head ready {t_ready - t0:.0f} s, job {sid} SUCCEEDED after {t_done - t_ready:.0f} s, "
          f"{t.num_rows} result rows for {N_SCENES} inputs; tracked pids: {len(ray_head.tracked_pids)}")
