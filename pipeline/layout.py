"""Where things live in a run directory, how a run directory is recognised, and the rule that an
audit's input and output never overlap.

    <run>/manifest.json                       config hash, every input shard with its row count
    <run>/_lease.json                         the output lease (pipeline/lease.py): which driver writes here
    <run>/results/<shard_key>.<hash>.parquet  final result files, and nothing else
    <run>/_staging/parts/...                  part files while shards run (pipeline/sinks.py)
    <run>/_staging/tmp/...                    a final file being written, before its atomic move
    <run>/_staging/rejected/...               final files that failed verification, kept for inspection
    <run>/summary.json, <run>/report/, <run>/_SUCCESS

`results/` holding only final files is what makes `pd.read_parquet("<run>/results/")`, a pyarrow
dataset or a duckdb glob read exactly the results. Runs written before this layout kept part files
in `results/_parts/` and temporary files in `results/`: reconcile moves them (manifest.py).
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from dcam.pipeline.storage import open_fs, scheme_of, with_retries

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
LEASE = "_lease.json"
RESULTS = "results"
STAGING = "_staging"
PARTS = f"{STAGING}/parts"
TMP = f"{STAGING}/tmp"
REJECTED = f"{STAGING}/rejected"
OLD_PARTS = f"{RESULTS}/_parts"  # the layout before issue 18
SYNTH_INPUT_SUFFIX = "-input"  # the no-argument run's corpus: a sibling of the run directory


@dataclass
class RunDir:
    """Paths of a run directory on its filesystem."""
    url: str
    storage_options: dict = field(repr=False)  # may hold credentials

    def __post_init__(self):
        self.fs, self.root = open_fs(self.url, self.storage_options)
        self.root = self.root.rstrip("/")
        if scheme_of(self.url) == "file":  # absolute: Ray workers write here and need not share our cwd
            self.url = self.root

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_text(self, rel: str, text: str) -> None:
        p = self.path(rel)
        self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: self.fs.pipe_file(p, text.encode()))

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(self.path(rel)).decode()

    def sizes(self, rel: str) -> dict[str, int]:
        """Name -> size of the files directly under `rel`, from one fresh listing (a reader that
        knows a small file's size fetches it in one request: no existence or size request first)."""
        p = self.path(rel)
        self.fs.invalidate_cache(p)
        if not self.fs.exists(p):
            return {}
        return {i["name"].rstrip("/").rsplit("/", 1)[-1]: int(i.get("size") or 0)
                for i in self.fs.ls(p, detail=True) if i.get("type") == "file"}

    def ls(self, rel: str) -> list[str]:
        """Files and folders directly under `rel` (fresh: s3fs would answer from its listing cache)."""
        p = self.path(rel)
        self.fs.invalidate_cache(p)
        if not self.fs.exists(p):
            return []
        return sorted(f for f in self.fs.ls(p, detail=False))


class OverlapError(ValueError):
    """The output lies inside the input prefix, or the input inside the output."""


def is_run_dir(names: set[str]) -> bool:
    """Whether a directory with these entries (relative names; a sub-directory's files as
    'results/x') is a dcam run directory: manifest.json beside results/, _SUCCESS or the lease."""
    if MANIFEST not in names:
        return False
    return bool({SUCCESS, LEASE} & names) or any(n.startswith(RESULTS + "/") or n == RESULTS for n in names)


def run_dirs_among(files: list[str]) -> set[str]:
    """Directories of `files` (full paths, e.g. from fs.find) that are dcam run directories."""
    by_dir: dict[str, set[str]] = {}
    for f in files:
        d = posixpath.dirname(f)
        if posixpath.basename(f) == MANIFEST:
            by_dir.setdefault(d, set())
    if not by_dir:
        return set()
    for f in files:
        for d in by_dir:
            if f.startswith(d + "/"):
                by_dir[d].add(f[len(d) + 1:])
    return {d for d, names in by_dir.items() if is_run_dir(names)}


def _location(url: str, storage_options: dict | None) -> tuple[str, str]:
    """(scheme, normalised path) for comparing locations: symlinks resolved on local disk."""
    scheme = scheme_of(url)
    _, path = open_fs(url, storage_options)
    if scheme == "file":
        return "file", os.path.realpath(path)
    return ("s3" if scheme == "s3a" else scheme), "/" + path.strip("/")


def _static_prefix(url: str) -> str:
    """The part of an input URL before its first glob character, cut back to a whole component."""
    cut = min((i for i, c in enumerate(url) if c in "*?["), default=None)
    return url if cut is None else url[:cut].rsplit("/", 1)[0]


def _inside(inner: str, outer: str) -> bool:
    outer = outer.rstrip("/") or "/"
    return inner == outer or inner.startswith(outer if outer.endswith("/") else outer + "/")


def check_disjoint(input_url: str, output_url: str, storage_options: dict | None = None) -> None:
    """Refuse an output inside the input (a rerun would list dcam's own files as input) and an
    input inside the output (reconcile and compaction own everything under the run directory)."""
    (si, pi), (so, po) = _location(_static_prefix(input_url), storage_options), _location(output_url, storage_options)
    if si != so:
        return
    if _inside(po, pi):
        raise OverlapError(f"output={output_url} is inside input={input_url}: a later audit of the input would read "
                           "dcam's own files as shards; write the run beside the input, not into it")
    if _inside(pi, po):
        raise OverlapError(f"input={input_url} is inside output={output_url}: the run directory belongs to dcam "
                           "(results, staging, lease); keep the input outside it")


def synth_input_url(run_url: str) -> str:
    """Where the no-argument run synthesises its corpus: `<run>-input`, beside the run."""
    return run_url.rstrip("/") + SYNTH_INPUT_SUFFIX
