"""The output lease: at most one driver writes a run directory at a time.

A driver takes `<run>/_lease.json` before it writes anything and keeps it for the job's lifetime:

    {"run_id": random, "host", "pid", "proc": {boot_id, pid_ns, start}, "acquired", "heartbeat",
     "expires", "ttl_s", "state": "held" | "released", "dcam": version}

- acquire: the lease is created only if absent (S3: PutObject If-None-Match: "*"; local disk: an
  exclusive flock around read-compare-replace, which holds between processes of one machine). A live lease of another run (state held, not
  expired, its process not known dead) is refused with one line naming the owner and the expiry.
  A released or expired lease, or one whose process is gone from this very machine, is taken
  over by a compare-and-swap on the version read (S3: If-Match on the ETag).
- heartbeat: a driver thread renews `expires` every `heartbeat_s` by the same compare-and-swap;
  it marks the lease lost when the document names another run or it cannot renew before expiry.
- fence: before every final write (each compacted shard's final file, _SUCCESS) the driver renews
  its lease by that compare-and-swap, so it holds it for another ttl_s, or stops with
  LeaseLostError when anyone else wrote the lease since (a takeover, a deletion).
- release: on exit (also on errors, Ctrl-C and SIGTERM) the document is marked released.

Expiry compares wall clocks of different machines: keep `ttl_s` far above their skew (NTP).
Stores without conditional writes (other fsspec schemes) get an advisory lease and a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from dcam.pipeline.layout import LEASE
from dcam.pipeline.storage import describe_error, scheme_of, secrets_of

DEFAULT_TTL_S = 120.0
DEFAULT_HEARTBEAT_S = 20.0
EXIT_OUTPUT_BUSY = 4  # `dcam run` refused (another driver holds the output) or stopped (it lost the lease)


class LeaseHeldError(RuntimeError):
    """Another live driver holds the output: this driver refuses to start."""


class LeaseLostError(RuntimeError):
    """This driver's lease expired or was taken over: it must stop writing."""


# -- stores: read / create-if-absent / compare-and-swap of one small document ----------------------
class LocalStore:
    """A lease file on local disk. Writers serialise on an exclusive flock of `<run>/.lease.lock`
    (released by the kernel if the process dies) and replace the document by atomic rename; the
    version token is the document's own `nonce`."""
    atomic = True

    def __init__(self, root: str):
        self.path = os.path.join(root, LEASE)
        self.lock_path = os.path.join(root, ".lease.lock")

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return None, None
        return doc, doc.get("nonce")

    def read(self):
        with self._locked():
            return self._read()

    def _write(self, doc: dict) -> str:
        doc = {**doc, "nonce": uuid.uuid4().hex}
        tmp = f"{self.path}.{doc['nonce']}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return doc["nonce"]

    def create(self, doc: dict):
        with self._locked():
            return None if os.path.exists(self.path) else self._write(doc)

    def replace(self, doc: dict, token):
        with self._locked():
            current, now_token = self._read()
            return self._write(doc) if current is not None and now_token == token else None


class S3Store:
    """A lease object on S3: conditional PutObject (If-None-Match / If-Match on the ETag)."""
    atomic = True
    _LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict"}

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = path.lstrip("/").partition("/")
        self.key = f"{self.key.rstrip('/')}/{LEASE}" if self.key else LEASE

    def read(self):
        """(document, ETag) from one GetObject, or (None, None) when there is no lease."""
        from fsspec.asyn import sync

        async def get():
            try:
                r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None, None
            async with r["Body"] as stream:
                return json.loads(await stream.read()), r["ETag"]

        return sync(self.fs.loop, get)

    def _put(self, doc: dict, **condition):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                   Body=json.dumps(doc, indent=1).encode(), ContentType="application/json",
                                   **condition)["ETag"]
        except OSError as e:
            if _precondition_failed(e, self._LOST_RACE):
                return None
            raise

    def create(self, doc: dict):
        return self._put(doc, IfNoneMatch="*")

    def replace(self, doc: dict, token):
        return self._put(doc, IfMatch=token)

    def honours_conditions(self, doc: dict) -> bool:
        """Whether the endpoint refuses a create-if-absent on the existing object (some S3
        implementations ignore the headers; then the lease is only advisory)."""
        return self._put(doc, IfNoneMatch="*") is None


class AdvisoryStore:
    """Any other fsspec filesystem: read-then-write, not atomic (a warning says so)."""
    atomic = False

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, f"{path.rstrip('/')}/{LEASE}"

    def read(self):
        try:
            doc = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None, None
        return doc, doc.get("nonce")

    def _write(self, doc):
        doc = {**doc, "nonce": uuid.uuid4().hex}
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.path, json.dumps(doc, indent=1).encode())
        return doc["nonce"]

    def create(self, doc):
        return None if self.read()[0] is not None else self._write(doc)

    def replace(self, doc, token):
        return self._write(doc) if self.read()[1] == token else None


def _precondition_failed(exc: BaseException, codes: set[str]) -> bool:
    """s3fs turns a 412/409 into FileExistsError or OSError(EINVAL); the botocore error is the cause."""
    while exc is not None:
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in codes or status in (409, 412)
        exc = exc.__cause__ or exc.__context__
    return False


def store_for(run):
    """The lease store of a RunDir (pipeline.manifest.RunDir)."""
    scheme = scheme_of(run.url)
    if scheme == "file":
        return LocalStore(run.root)
    if scheme in ("s3", "s3a"):
        return S3Store(run.fs, run.root)
    return AdvisoryStore(run.fs, run.root)


# -- who owns it -------------------------------------------------------------------------------------
def _proc_identity(pid: int) -> dict:
    """What tells this machine's processes apart beyond the pid: boot, pid namespace, start time."""
    out = {}
    with contextlib.suppress(OSError):
        out["boot_id"] = open("/proc/sys/kernel/random/boot_id").read().strip()
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = open(f"/proc/{pid}/stat").read()
        out["start"] = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
    return out


def owner_gone(doc: dict) -> bool:
    """True only when the owner provably ran on this machine (host, boot and pid namespace match)
    and its process no longer exists (or the pid now belongs to a younger process)."""
    proc, mine = doc.get("proc") or {}, _proc_identity(os.getpid())
    if doc.get("host") != socket.gethostname() or not proc.get("boot_id") or not proc.get("pid_ns"):
        return False
    if proc.get("boot_id") != mine.get("boot_id") or proc.get("pid_ns") != mine.get("pid_ns"):
        return False
    now = _proc_identity(int(doc.get("pid", -1))) if int(doc.get("pid", -1)) > 0 else {}
    if "start" not in now:
        return not os.path.exists(f"/proc/{doc.get('pid')}")
    return proc.get("start") is not None and now["start"] != proc["start"]


def describe_owner(doc: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    beat = now - float(doc.get("heartbeat", now))
    return (f"run {doc.get('run_id')} on host {doc.get('host')} (pid {doc.get('pid')}), last heartbeat "
            f"{beat:.0f}s ago")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def stale_reason(doc: dict, now: float) -> str | None:
    """Why a lease may be taken over (None: it is live)."""
    if doc.get("state") == "released":
        return "released"
    if float(doc.get("expires", 0.0)) <= now:
        return f"expired {now - float(doc.get('expires', 0.0)):.0f}s ago"
    if owner_gone(doc):
        return "its process is gone from this machine"
    return None


# -- the driver's lease --------------------------------------------------------------------------------
class OutputLease:
    """This driver's hold on a run directory: acquire(), start_heartbeat(), check() in loops,
    fence(what) before each final write, release() on exit (see the module doc)."""

    def __init__(self, run, ttl_s: float = DEFAULT_TTL_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S, log=print):
        if not 0 < 2 * float(heartbeat_s) <= float(ttl_s):
            raise ValueError(f"lease.heartbeat_s={heartbeat_s} must be positive and at most half of "
                             f"lease.ttl_s={ttl_s}")
        self.url, self.store, self.log = run.url, store_for(run), log
        self.ttl_s, self.heartbeat_s = float(ttl_s), float(heartbeat_s)
        self.secrets = secrets_of(run.storage_options)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.token, self.acquired, self.expires = None, 0.0, 0.0
        self.lost: str | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and the driver never interleave writes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self, now: float, state: str = "held") -> dict:
        from dcam import __version__

        return dict(version=1, run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                    proc=_proc_identity(os.getpid()), acquired=self.acquired or now, heartbeat=now,
                    expires=now + self.ttl_s, expires_utc=_utc(now + self.ttl_s), ttl_s=self.ttl_s, state=state,
                    dcam=__version__)

    def held_message(self, doc: dict, now: float) -> str:
        exp = float(doc.get("expires", now))
        return (f"output {self.url} is in use by {describe_owner(doc, now)}; its lease expires at {_utc(exp)} "
                f"(in {max(0.0, exp - now):.0f}s). Wait for that job to finish; if it is gone, delete "
                f"{self.url.rstrip('/')}/{LEASE} or rerun after the lease expires")

    def acquire(self) -> "OutputLease":
        for _ in range(5):  # a lost race (another driver wrote in between) is re-read and re-decided
            doc, token = self.store.read()
            now = time.time()
            if doc is None:
                new = self.store.create(self._doc(now))
            else:
                why = stale_reason(doc, now)
                if why is None:
                    raise LeaseHeldError(self.held_message(doc, now))
                new = self.store.replace(self._doc(now), token)
                if new is not None and why != "released":
                    self.log(f"taking over the lease of {describe_owner(doc, now)}: {why}")
            if new is not None:
                self.token, self.acquired, self.expires = new, now, now + self.ttl_s
                self._warn_if_advisory(now)
                return self
        raise LeaseHeldError(f"output {self.url}: could not take the lease, other drivers kept changing "
                             f"{LEASE}; is another job starting on the same output?")

    def _warn_if_advisory(self, now: float) -> None:
        advisory = not self.store.atomic or (isinstance(self.store, S3Store)
                                             and not self.store.honours_conditions(self._doc_of_token(now)))
        if advisory:
            self.log(f"WARNING: the storage of {self.url} does not support conditional writes: the output lease "
                     "is advisory; never start two drivers on this output")

    def _doc_of_token(self, now: float) -> dict:
        doc, _ = self.store.read()
        return doc or self._doc(now)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dcam-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew("the heartbeat")
            except LeaseLostError:
                return
            except Exception as e:  # noqa: BLE001 - storage trouble: retried at the next beat until expiry
                why = describe_error(e, self.secrets)
                if time.time() < self.expires:
                    self.log(f"WARNING: lease heartbeat failed, retrying: {why}")
                    continue
                with contextlib.suppress(LeaseLostError):  # recorded in self.lost; the driver raises it
                    self._mark_lost(f"could not renew it before it expired: {why}")
                return

    def renew(self, what: str) -> None:
        """Extend the lease by a compare-and-swap on the version this driver wrote last; raise
        LeaseLostError if anyone else wrote it since (taken over, deleted or released)."""
        with self._mutex:
            self.check()
            now = time.time()
            new = self.store.replace(self._doc(now), self.token)
            if new is None:
                doc, _ = self.store.read()
                owner = describe_owner(doc, now) if doc else "nobody (the lease file was deleted)"
                self._mark_lost(f"{LEASE} now names {owner}; this driver stopped before {what}")
            self.token, self.expires = new, now + self.ttl_s

    def fence(self, what: str) -> None:
        """Before a final write: renew (so the lease is ours and live for another ttl_s) or stop."""
        self.renew(what)

    def check(self) -> None:
        """Raise LeaseLostError when the heartbeat found the lease lost (no storage access)."""
        if self.lost is not None:
            raise LeaseLostError(self.lost)

    def _mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = f"output {self.url}: this driver (run {self.run_id}) lost its lease: {reason}"
            self.log(f"LEASE LOST: {self.lost}")
        raise LeaseLostError(self.lost)

    def release(self) -> None:
        """Mark the lease released (kept as a record of the last owner); never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s))
        with self._mutex:
            if self.lost is not None or self.token is None:
                return
            try:
                if self.store.replace(self._doc(time.time(), state="released"), self.token) is None:
                    self.log(f"WARNING: {LEASE} of {self.url} was changed by another driver; left as it is")
            except Exception as e:  # noqa: BLE001 - reported; the lease then simply expires
                self.log(f"WARNING: could not release the lease of {self.url} (it expires at {_utc(self.expires)}): "
                         f"{describe_error(e, self.secrets)}")
            self.token = None

    def __enter__(self) -> "OutputLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
