"""Issue 7 at job level: hostile input, a killed driver, a model that cannot load."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from badinput import outcome_key, write_bad_input_shard
from jobutil import FAST, _keys, _results, _run

from dcam.actors import scenes
from dcam.pipeline.synth import write_corpus

pytestmark = pytest.mark.slow

# what the probe adds on top of decode-level expectations
PROBE_OUTCOMES = {"unknown_words_response": ("error", "response"), "explain_word_absent": ("error", "target")}


def test_bad_input_corpus_every_row_accounted_for(ray_local, tmp_path, random_ckpt):
    expected = write_bad_input_shard(str(tmp_path / "in" / "bad.parquet"))
    expected.update(PROBE_OUTCOMES)
    s = _run([f"input={tmp_path / 'in' / 'bad.parquet'}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}",
              "decode.max_pixels=40000000", *FAST])
    t = _results(str(tmp_path / "out")).to_pandas()
    per_input = t.sort_values("token_index").groupby("row_index").first()
    assert len(per_input) == len(expected) == s["inputs"]
    assert s["ok"] + sum(s["errors"].values()) == len(expected)
    seen: dict[str, int] = {}
    for _, row in per_input.sort_index().iterrows():
        seen[row.id] = seen.get(row.id, 0) + 1
        status, what = expected[outcome_key(row.id, seen[row.id])]
        assert row.status == status, (row.id, row.status, row.error)
        if status == "error":
            assert row.error_kind == what and row.error, (row.id, row.error_kind, row.error)
            assert (t[(t.row_index == row.name)].status == "error").all() and (t.row_index == row.name).sum() == 1
        elif what:
            assert what in row.notes, (row.id, row.notes)


def _dcam(args, tmp_path, **kw):
    # the checkout under test first on the path: from cwd=tmp_path, `-m dcam` would otherwise import
    # whichever dcam is installed (e.g. an editable install of another worktree), not this code
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS="",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS")
    return subprocess.Popen([sys.executable, "-m", "dcam", "run", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path), **kw)


def _kill_session(proc, temp_dir) -> None:
    """Kill the driver's process group and any Ray process of its private temp dir (by pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if str(temp_dir) in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_driver_killed_mid_run_then_rerun_finishes_exactly_once(ray_local, tmp_path, random_ckpt):
    write_corpus(str(tmp_path / "in"), 24, 1107, 4, scenes.SceneConfig())
    common = [f"input={tmp_path / 'in'}", f"model.source={random_ckpt}", "ray.num_cpus=2", "ray.num_gpus=1",
              "ray.object_store_memory=300000000", *FAST]
    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray socket paths must fit in 107 bytes
    # the driver holds after its first final file (testing.hold_after_compactions), so the kill lands
    # mid-run however fast the pipeline is (it used to race: all 6 shards could be final, or _SUCCESS written)
    proc = _dcam([*common, f"output={tmp_path / 'cut'}", f"ray.temp_dir={temp}", "testing.hold_after_compactions=1"],
                 tmp_path)
    results = tmp_path / "cut" / "results"
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and any(p.suffix == ".parquet" for p in results.iterdir()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run finished before it could be interrupted: " + proc.stdout.read()[-2000:]
    finally:
        _kill_session(proc, temp)
    done_before = {p.name for p in results.glob("*.parquet")}
    assert len(done_before) == 1 and not (tmp_path / "cut" / "_SUCCESS").exists()
    logs = []
    s = _run([*common, f"output={tmp_path / 'cut'}"], log=logs.append)  # the same command, rerun
    line = next(m for m in logs if "already complete" in m)
    already = int(line.split(" already complete")[0].rsplit(" ", 1)[1])
    assert 1 <= already <= 6, line  # the final file is kept; complete-but-uncompacted shards are compacted, not rerun
    assert {p.name for p in results.glob("*.parquet")} >= done_before and s["inputs"] == 24
    _run([*common, f"output={tmp_path / 'ref'}"])
    ref, cut = _results(str(tmp_path / "ref")), _results(str(tmp_path / "cut"))
    assert _keys(ref) == _keys(cut) and len(_keys(cut)) == len(set(_keys(cut)))


def _run_until_exit(args, tmp_path, timeout=150) -> tuple[int, str]:
    temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")
    proc = _dcam([*args, f"ray.temp_dir={temp}"], tmp_path)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung instead of failing")
    finally:
        _kill_session(proc, temp)
    return proc.returncode, out


def test_actor_that_cannot_load_the_model_fails_the_job_clearly(tmp_path, random_ckpt):
    import shutil

    bad = tmp_path / "broken-ckpt"
    shutil.copytree(random_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    write_corpus(str(tmp_path / "in"), 4, 1108, 4, scenes.SceneConfig())
    rc, out = _run_until_exit([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={bad}",
                               "ray.num_cpus=2", "ray.num_gpus=1", "ray.object_store_memory=300000000", *FAST],
                              tmp_path)
    assert rc != 0
    assert "ProbeActor could not load the model" in out, out[-3000:]
    assert "safetensors" in out.lower() or "header" in out.lower(), out[-3000:]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_actor_request_no_node_can_host_fails_fast_instead_of_hanging(tmp_path, random_ckpt):
    # Regression: actors.num_gpus=1 on a local CPU-only Ray waited forever (Ray Data only warns).
    write_corpus(str(tmp_path / "in"), 4, 1108, 4, scenes.SceneConfig())
    rc, out = _run_until_exit([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}",
                               "ray.num_cpus=2", "ray.num_gpus=0", "ray.object_store_memory=300000000", *FAST],
                              tmp_path, timeout=120)
    assert rc != 0
    assert "no Ray node can host one ProbeActor" in out and "actors.num_gpus=0" in out, out[-3000:]


def test_missing_checkpoint_is_refused_before_ray(tmp_path):
    from dcam.actors.models.loading import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        _run([f"output={tmp_path / 'out'}", f"model.source={tmp_path / 'nope'}"])
    assert not (tmp_path / "out").exists()
