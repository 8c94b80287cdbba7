"""`dcam bench-large`: the job at scale with the stand-in probe (benchmarks/standin_probe.py), on
local disk or on a loopback S3 (moto server in a subprocess, 127.0.0.1 only). Not run in CI.

Phases, each in a fresh subprocess so its peak RSS (VmHWM) is its own:
  run     the whole job over `images` rows in `shards` shards: driver peak RSS, wall time,
          compaction time (summed over shards, as the driver's compaction threads spend it)
  resume  the same command again on the finished run: wall time, manifest + listing + reconcile
          time (what a resumed run spends before it knows there is nothing to do), peak RSS
  report  `dcam report` of the run: wall time, peak RSS

The input is dcam synth's format (Parquet shards: image PNG, mask PNG, prompt, response,
objects) built from `distinct_scenes` scenes reused under unique ids: scene generation costs
16 ms each, 27 minutes for 100k on this machine, and the job's cost does not depend on which
pixels an image holds.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

from dcam.pipeline.config import load_config
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log

FAKE_KEY, FAKE_SECRET, REGION = "dcam-bench-key", "dcam-bench-secret-not-real", "us-east-1"


@dataclass
class BenchLargeConfig:
    """conf/bench_large.yaml."""
    images: int = key(ge=1)
    shards: int = key(ge=1)
    storage: str = key(choices=("local", "s3"))
    image_size: int = key(ge=8)
    distinct_scenes: int = key(ge=1)
    grid: int = key(ge=1)
    words: int = key(ge=1)
    gpu_s_per_image: float = key(ge=0)
    actors: int = key(ge=1)
    batch_size: int = key(ge=1)
    seed: int = key()
    workdir: Optional[str] = key()
    phases: List[str] = key()

    @staticmethod
    def cross_check(cfg) -> str | None:
        bad = [p for p in cfg.phases if p not in ("run", "resume", "report")]
        return f"phases: unknown {bad} (run, resume, report)" if bad else None


# -- input --------------------------------------------------------------------------------------
def write_input(url: str, c: dict, storage: dict) -> None:
    """`shards` dcam-synth Parquet shards holding `images` rows (ids unique, scenes reused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcam.actors import scenes
    from dcam.pipeline.storage import open_fs
    from dcam.pipeline.synth import scene_table

    base = scene_table(int(c["seed"]), 0, int(c["distinct_scenes"]), scenes.SceneConfig(size=int(c["image_size"])))
    fs, root = open_fs(url, storage)
    fs.makedirs(root, exist_ok=True)
    per, extra = divmod(int(c["images"]), int(c["shards"]))
    start = 0
    for k in range(int(c["shards"])):
        n = per + (k < extra)
        idx = pa.array([(start + j) % base.num_rows for j in range(n)])
        t = base.take(idx).set_column(0, "id", pa.array([f"img-{start + j:08d}" for j in range(n)]))
        with fs.open(f"{root.rstrip('/')}/shard-{k:05d}.parquet", "wb") as f:
            pq.write_table(t, f, compression="zstd", write_statistics=False)
        start += n


# -- loopback S3 ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\ns.start()\n"
        "print('ready', flush=True)\nwhile True:\n    time.sleep(3600)\n")


def start_moto() -> tuple[subprocess.Popen, dict, dict]:
    """moto in its own process (its object store must not count in the driver's RSS); returns
    the process, the env for every child and dcam's storage options."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=FAKE_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stdout=subprocess.PIPE, env=env, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the moto server did not start")
    storage = dict(endpoint_url=endpoint, key=FAKE_KEY, secret=FAKE_SECRET, region=REGION)
    import s3fs

    fs = s3fs.S3FileSystem(key=FAKE_KEY, secret=FAKE_SECRET, endpoint_url=endpoint)
    for bucket in ("bench-input", "bench-runs"):
        fs.call_s3("create_bucket", Bucket=bucket)
    return proc, env, storage


# -- phases (each in a subprocess) ---------------------------------------------------------------
def run_overrides(c: dict, input_url: str, run_url: str, storage: dict, ray_temp: str) -> list[str]:
    so = [f"storage.{k}={v}" for k, v in storage.items()]
    return [f"input={input_url}", f"output={run_url}", "format=parquet", "report.enabled=false",
            f"actors.pool_min={c['actors']}", f"actors.pool_max={c['actors']}", "actors.num_gpus=1", "actors.num_cpus=0",
            f"probe.batch_size={c['batch_size']}", "ray.num_cpus=2", "ray.num_gpus=1",
            "ray.object_store_memory=536870912", "ray.progress_bars=false", f"ray.temp_dir={ray_temp}", *so]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss can carry a parent's mark over fork+exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def phase_job(c: dict, overrides: list[str]) -> dict:
    """The job (run or resume) with the stand-in probe; times of its driver-side steps."""
    from dcam.benchmarks.standin_probe import StandInProbe
    from dcam.pipeline import job
    from dcam.pipeline.config import to_dict

    timers = {k: 0.0 for k in ("list_shards", "load_or_create_manifest", "reconcile", "compact_shard",
                               "complete_run")}
    for name in timers:
        setattr(job, name, _timed(getattr(job, name), timers, name))
    cfg = load_config("run", overrides)
    stand_in = (StandInProbe, dict(methods=to_dict(cfg)["methods"], gpu_s_per_image=float(c["gpu_s_per_image"]),
                                   grid=int(c["grid"]), words=int(c["words"])))
    t0 = time.perf_counter()
    s = job.run_job(cfg, log=lambda m: print(f"[{time.perf_counter() - t0:8.2f} s] {m}", file=sys.stderr, flush=True),
                    probe_stage=stand_in)
    return dict(seconds=time.perf_counter() - t0, driver_peak_rss_mb=peak_rss_mb(),
                step_seconds={k: round(v, 3) for k, v in timers.items()}, inputs=s.get("inputs"),
                timing=s.get("timing"))


def _timed(fn, timers: dict, name: str):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timers[name] += time.perf_counter() - t
    return wrapper


def phase_report(run_url: str, storage: dict, out_dir: str) -> dict:
    from dcam.pipeline.report.build import build_report

    t0 = time.perf_counter()
    build_report(run_url, storage, out_dir=out_dir, log=lambda m: None)
    return dict(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())


def child(argv: list[str]) -> None:
    """`python -m dcam.benchmarks.bench_large <phase> <json args>`: one phase, one JSON line."""
    phase, a = argv[0], json.loads(argv[1])
    if phase == "report":
        out = phase_report(a["run_url"], a["storage"], a["out_dir"])
    else:
        out = phase_job(a["c"], a["overrides"])
    print("BENCH_RESULT " + json.dumps(out, default=float), flush=True)


def run_phase(phase: str, args: dict, env: dict, log, log_dir: str) -> dict:
    """One phase in a fresh interpreter; its stderr is kept in <log_dir>/<phase>.log."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "dcam.benchmarks.bench_large", phase, json.dumps(args)], env=env,
                       capture_output=True, text=True)
    with open(f"{log_dir}/{phase}.log", "w") as f:
        f.write(p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"phase {phase} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(lines[-1].split(" ", 1)[1])
    log(f"{phase}: {json.dumps(out)} ({time.perf_counter() - t0:.1f} s with start-up)")
    return out


def run_bench_large(c: dict, log=print) -> dict:
    root = c["workdir"] or tempfile.mkdtemp(prefix="dcam-large-")
    os.makedirs(root, exist_ok=True)
    ray_temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    moto, env, storage = (None, dict(os.environ), {})
    try:
        if c["storage"] == "s3":
            moto, env, storage = start_moto()
            input_url, run_url = "s3://bench-input/shards", "s3://bench-runs/run"
        else:
            input_url, run_url = f"{root}/input", f"{root}/run"
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=_pythonpath())
        t0 = time.perf_counter()
        write_input(input_url, c, storage)
        log(f"input: {c['images']} images in {c['shards']} shards at {input_url} ({time.perf_counter() - t0:.1f} s)")
        ov = run_overrides(c, input_url, run_url, storage, ray_temp)
        out = dict(images=int(c["images"]), shards=int(c["shards"]), storage=c["storage"], grid=int(c["grid"]),
                   words=int(c["words"]), output_rows=int(c["images"]) * int(c["words"]))
        for phase in c["phases"]:
            args = dict(run_url=run_url, storage=storage, out_dir=f"{root}/report") if phase == "report" \
                else dict(c=c, overrides=ov)
            out[phase] = run_phase(phase, args, env, log, root)
        return out
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(ray_temp, ignore_errors=True)
        if not c["workdir"]:
            shutil.rmtree(root, ignore_errors=True)


def _pythonpath() -> str:
    """The checkout that holds this dcam, first on the children's path (a worktree runs its own code)."""
    import dcam

    top = os.path.dirname(os.path.dirname(os.path.abspath(dcam.__file__)))
    return os.pathsep.join([top, *filter(None, [os.environ.get("PYTHONPATH")])])


def command(args) -> int:
    """`dcam bench-large [--json] [k=v ...]`."""
    from dcam.pipeline.config import to_dict

    cfg = load_config("bench_large", args.overrides, schema=BenchLargeConfig)
    emit(run_bench_large(to_dict(cfg), log=log), args.json)
    return 0


if __name__ == "__main__":
    child(sys.argv[1:])
