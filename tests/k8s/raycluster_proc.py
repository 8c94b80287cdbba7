"""A local Ray head started by a test with `ray start --head`, owned by process id.

Used by the `ray job submit` end-to-end test. What it guarantees:

- Isolation. Its own short temp dir (`--temp-dir`), its own free loopback ports for every Ray
  service (GCS, dashboard, agents, node/object manager, client server, metrics; worker ports are
  OS-assigned), and an environment with every inherited ``RAY_*`` variable removed (no stray
  RAY_ADDRESS, no RAY_AUTH_* from a session fixture's ``ray.init``). So it never touches the
  session's ``ray_local`` cluster or a user's cluster.
- Token auth as Ray >= 2.59 requires for local clusters, without touching the user's token.
  Ray's token loader looks at RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.
  The head, every process it starts (workers, the job supervisor and the job's driver inherit the
  raylet's environment) and every CLI call get RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<a fresh
  random token>, and HOME points at a private directory, so ~/.ray/auth_token of the real user is
  neither read nor written.
- Ownership by process id. The head runs as `ray start --head --block`: the `ray start` process
  stays our child and its Node starts GCS, raylet, dashboard, monitors (the raylet starts the
  workers, the job supervisor and, through it, the job's driver) as its descendants. `track()`
  records every descendant (psutil.Process, which also pins the start time, so a recycled PID is
  never signalled), plus any process whose command line names our unique temp dir.
  `stop()` sends SIGTERM to `ray start` (Ray's own orderly shutdown of its children), then SIGTERM
  and, after a grace period, SIGKILL to every recorded process still alive. Never `ray stop`
  (it kills every Ray process on the machine by name, including other tests' clusters).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil  # noqa: E402
import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path when psutil is not installed)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PORT_OPTIONS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
                "ray-client-server-port")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_executable() -> str:
    """The `ray` console script of this interpreter (not a pyenv shim: HOME is changed)."""
    cand = Path(sys.executable).parent / "ray"
    if cand.exists():
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` CLI is not installed (pip install 'ray[default]>=2.60,<2.61')")
    return found


class LocalRayHead:
    """`ray start --head --block` in a private temp dir; see the module docstring."""

    def __init__(self, root: Path, num_cpus: int = 2, num_gpus: int = 0, object_store_memory: int = 500_000_000,
                 extra_env: dict | None = None):
        self.root = Path(root)
        self.temp_dir = self.root / "ray"  # root must be short: Ray's unix socket paths live below it
        self.home = self.root / "home"
        self.log_path = self.root / "ray-start.log"
        self.token = secrets.token_hex(32)
        self.ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS))))
        self.dashboard_url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.gcs_address = f"127.0.0.1:{self.ports['port']}"
        self.num_cpus, self.num_gpus, self.object_store_memory = num_cpus, num_gpus, object_store_memory
        self.env = self._make_env(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._started_at = 0.0
        self._tracked: dict[tuple[int, float], psutil.Process] = {}

    # -- environment -----------------------------------------------------------------------------
    def _make_env(self, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        bindir = str(Path(sys.executable).parent)
        env.update(
            HOME=str(self.home),
            PATH=bindir + os.pathsep + env.get("PATH", ""),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: shut down now, no 30 s drain
            PYTHONUNBUFFERED="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        env.update(extra)
        return env

    # -- start -----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        cmd += [f"--{opt}={port}" for opt, port in self.ports.items()]
        cmd += ["--min-worker-port=0", "--max-worker-port=0", f"--num-cpus={self.num_cpus}",
                f"--num-gpus={self.num_gpus}", f"--object-store-memory={self.object_store_memory}",
                f"--temp-dir={self.temp_dir}", "--disable-usage-stats", "--log-style=record", "--log-color=false"]
        return cmd

    def start(self) -> None:
        """Launch `ray start --head --block` (returns at once; see wait_ready)."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._started_at = time.time()
        # start_new_session: a Ctrl-C in the terminal reaches pytest only; stop() owns the shutdown.
        self.proc = subprocess.Popen(self.command(), env=self.env, cwd=str(self.root), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.track()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until the Jobs API answers an authenticated request (fails fast if `ray start` exits)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.track()
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.http("GET", "/api/jobs/", timeout=10)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (OSError, urllib.error.URLError) as e:  # not listening yet
                last = repr(e)
            time.sleep(2)
        raise TimeoutError(f"Ray head not ready after {timeout:.0f} s (last: {last}):\n{self.log_tail()}")

    # -- clients ---------------------------------------------------------------------------------
    def http(self, method: str, path: str, auth: bool = True, timeout: float = 30) -> tuple[int, object]:
        """A request to the dashboard; returns (status, parsed JSON or text). Never raises on 4xx/5xx."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        req = urllib.request.Request(self.dashboard_url + path, method=method, headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        try:
            with opener.open(req, timeout=timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        text = body.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """`ray <args>` with this head's environment (token auth) and address."""
        return subprocess.run([ray_executable(), *args], env=self.env, cwd=str(self.root), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def job_info(self, submission_id: str) -> dict:
        status, body = self.http("GET", f"/api/jobs/{submission_id}")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"GET /api/jobs/{submission_id}: HTTP {status}: {str(body)[:500]}")
        return body

    def job_logs(self, submission_id: str) -> str:
        try:
            status, body = self.http("GET", f"/api/jobs/{submission_id}/logs")
        except OSError as e:
            return f"<no logs: {e!r}>"
        return body.get("logs", "") if isinstance(body, dict) else f"<HTTP {status}: {str(body)[:500]}>"

    def wait_job(self, submission_id: str, timeout: float = 480.0, poll: float = 3.0) -> dict:
        """Poll until the job is SUCCEEDED / FAILED / STOPPED; returns the job info."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            self.track()  # the supervisor, the driver and its workers come and go: record them all
            try:
                info = self.job_info(submission_id)
            except (OSError, RuntimeError) as e:  # a transient hiccup of a loaded dashboard
                info = {"status": f"<{e!r}>"}
            if info.get("status") in TERMINAL:
                return info
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {self.proc.returncode} while the job ran:\n"
                                   f"{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"job {submission_id} not finished after {timeout:.0f} s (last: {info.get('status')})\n"
                           f"--- job logs ---\n{self.job_logs(submission_id)[-6000:]}")

    # -- process ownership ------------------------------------------------------------------------
    def _record(self, p: psutil.Process) -> None:
        try:
            self._tracked.setdefault((p.pid, p.create_time()), p)
        except psutil.Error:
            pass

    def track(self) -> None:
        """Record `ray start` and all its descendants, plus processes naming our temp dir."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
            self._record(root)
            for c in root.children(recursive=True):
                self._record(c)
        except psutil.Error:
            pass
        # Safety net for anything that got re-parented (its parent exited): the temp dir is unique to
        # this head (mkdtemp), and we only consider processes of our user started after the head.
        marker, uid = str(self.temp_dir), os.getuid()
        for p in psutil.process_iter(["cmdline", "create_time", "uids"]):
            try:
                info = p.info
                if (info["uids"] is None or info["uids"].real != uid or info["create_time"] is None
                        or info["create_time"] < self._started_at - 1):
                    continue
                if any(marker in a for a in info["cmdline"] or ()):
                    self._record(p)
                    for c in p.children(recursive=True):
                        self._record(c)
            except psutil.Error:
                continue

    @property
    def tracked_pids(self) -> list[int]:
        return sorted(pid for pid, _ in self._tracked)

    def alive(self) -> list[psutil.Process]:
        """Recorded processes still running (same PID *and* start time; zombies count as gone)."""
        out = []
        for p in self._tracked.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def stop(self, grace: float = 45.0) -> list[psutil.Process]:
        """Terminate exactly the processes this head started. Returns survivors (should be [])."""
        if self.proc is None:
            return []
        try:
            self.track()
            if self.proc.poll() is None:  # Ray's own orderly shutdown of its children first
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            rest = self.alive()
            for p in rest:
                try:
                    p.terminate()  # psutil re-checks the start time: a recycled PID is never signalled
                except psutil.Error:
                    pass
            _, rest = psutil.wait_procs(rest, timeout=10)
            for p in rest:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(rest, timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            time.sleep(0.5)
            return self.alive()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
