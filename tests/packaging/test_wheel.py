"""The built wheel, installed into a fresh virtual environment, runs `dcam run` end to end on a
local Ray from a working directory that holds the user's own `pipeline/` and `conf/` packages.

`ray job submit --working-dir .` puts the user's working directory on every worker's sys.path.
When dcam installed top-level packages named `pipeline`, `actors` and `conf`, the workers imported
the user's `pipeline` instead of dcam's (or the reverse). Here the user's packages are traps:
importing them writes a marker file and raises, so any import of them by the driver or a worker
fails the job and the test.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TRAP = '''import os, pathlib
pathlib.Path(os.environ["DCAM_TRAP_DIR"], __name__ + ".imported").write_text(str(os.getpid()))
raise ImportError("the user's own {name!r} package was imported instead of dcam's")
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # setuptools' build/ dir, kept out of the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, cwd=build, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (whl,) = out.glob("dcam-*.whl")
    return whl


def test_wheel_installs_one_top_level_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dcam"}
    for needed in ("dcam/pipeline/cli.py", "dcam/actors/probe/explain.py", "dcam/conf/run.yaml",
                   "dcam/conf/model/tiny.yaml", "dcam/actors/models/weights/tiny/model.safetensors",
                   "dcam/evals/eval_cam.py", "dcam/benchmarks/bench_refine.py", "dcam/training/train_tiny.py"):
        assert needed in names, needed


def _fresh_venv(path: Path, wheel: Path) -> Path:
    """A new venv that sees this interpreter's packages (torch, ray, ...) but gets dcam only from
    the wheel (its own site-packages come first on sys.path)."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    return python


def _user_project(cwd: Path) -> None:
    for name in ("pipeline", "conf", "actors"):
        (cwd / name).mkdir(parents=True)
        (cwd / name / "__init__.py").write_text(TRAP.replace("{name!r}", repr(name)))


def test_dcam_run_from_a_working_dir_with_its_own_pipeline_and_conf(wheel, tmp_path):
    python = _fresh_venv(tmp_path / "venv", wheel)
    cwd, traps = tmp_path / "project", tmp_path / "traps"
    traps.mkdir()
    _user_project(cwd)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", DCAM_TRAP_DIR=str(traps))
    where = subprocess.run([str(python), "-c", "import dcam; print(dcam.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel, not the checkout's editable install
    temp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # short: Ray socket paths must fit in 107 bytes
    args = [str(tmp_path / "venv" / "bin" / "dcam"), "run", f"output={tmp_path / 'run'}", "synth.n=8",
            "synth.shard_size=4", "probe.faithfulness_steps=0", "report.enabled=false", "ray.num_cpus=2",
            "ray.object_store_memory=300000000", "ray.progress_bars=false", f"ray.temp_dir={temp}"]
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert not list(traps.iterdir()), f"user packages imported: {[p.name for p in traps.iterdir()]}\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "run" / "_SUCCESS").exists(), out[-3000:]
    assert "8/8 rows (8 ok)" in out or "8 ok" in out, out[-3000:]
