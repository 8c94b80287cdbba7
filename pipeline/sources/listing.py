"""Listing input shards: a file, a directory or prefix (recursive), or a glob; format detection."""
from __future__ import annotations

import posixpath
import re

from dcam.pipeline.layout import MANIFEST, is_run_dir, run_dirs_among
from dcam.pipeline.sources.base import EXTENSIONS, FORMATS, ShardSpec, SourceError, make_shard_key, redact_url
from dcam.pipeline.storage import (
    RetriesExhaustedError,
    describe_error,
    is_transient,
    open_fs,
    retry_settings,
    scheme_of,
    secrets_of,
    with_retries,
)


class SourceUnavailableError(SourceError):
    """The input could not be listed for a reason a retry may fix (endpoint unreachable, throttled)."""


def list_shards(input_url: str, fmt: str = "auto", storage_options: dict | None = None) -> list[ShardSpec]:
    """Shards under a file URL, a directory/prefix (recursive) or a glob, sorted by URL.

    Names starting with '.' or '_' (_SUCCESS, .DS_Store, _temporary/) are skipped when expanding,
    and so is every dcam run directory (manifest.json beside results/, _SUCCESS or _lease.json):
    dcam's own output is never input. An input that is, or lies inside, a run directory is refused.
    fmt="auto" picks by extension: .tar -> webdataset (img2dataset's .parquet/.json sidecars are not shards;
    the .parquet is read with its tar, see sources.webdataset),
    .parquet -> parquet or img2dataset_parquet (by the first file's schema), .jsonl, .csv, .json -> coco;
    a mix of parquet/jsonl/csv is refused as ambiguous.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; known: {('auto',) + FORMATS}")
    fs, path = open_fs(input_url, storage_options)
    secrets = secrets_of(storage_options)
    attempts, base = retry_settings(storage_options)
    try:
        files = with_retries(lambda: _expand(fs, path), attempts, base, secrets=secrets)
        run_dir = with_retries(lambda: _enclosing_run_dir(fs, path), attempts, base, secrets=secrets)
    except Exception as e:  # noqa: BLE001 - reported as a shard-level error
        cls = SourceUnavailableError if isinstance(e, RetriesExhaustedError) or is_transient(e) else SourceError
        raise cls(f"cannot list {redact_url(input_url, secrets)}: {describe_error(e, secrets)}") from None
    if run_dir is not None:
        raise SourceError(f"input {redact_url(input_url, secrets)} is inside a dcam run directory ({run_dir} holds "
                          f"{MANIFEST} and results): dcam's output is never read as input; give the run's input")
    named_file = len(files) == 1 and files[0].rstrip("/") == path.rstrip("/")
    chosen = fmt if fmt != "auto" else _detect_format(files, redact_url(input_url, secrets))
    files = [f for f in files if f.lower().endswith(EXTENSIONS[chosen]) and not f.endswith("_stats.json")]
    if chosen == "coco" and not named_file:
        files = coco_instances_files(files, redact_url(input_url, secrets))
    if not files:
        raise SourceError(f"no {chosen} shards found at {redact_url(input_url, secrets)}")
    if fmt == "auto" and chosen == "parquet":
        try:
            chosen = _sniff_parquet(fs, files[0])
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot read the parquet schema of {redact_url(files[0], secrets)}: "
                              f"{describe_error(e, secrets)}") from None
    scheme = scheme_of(input_url)
    urls = sorted(f if scheme == "file" else fs.unstrip_protocol(f) for f in files)
    return [ShardSpec(u, chosen, make_shard_key(u)) for u in urls]


def _expand(fs, path: str) -> list[str]:
    """Files named by a glob, a directory (recursive), a file, or a bare key prefix."""
    fs.invalidate_cache()
    if any(c in path for c in "*?["):
        out = []
        for p in fs.glob(path):
            if not posixpath.basename(p.rstrip("/")).startswith((".", "_")):
                out += _files_under(fs, p) if fs.isdir(p) else [p]
        return sorted(set(out))
    if fs.isdir(path):
        return _files_under(fs, path)
    if fs.exists(path):
        return [path]
    prefixed = [p for p in fs.glob(path.rstrip("/") + "*") if not fs.isdir(p)]  # a bare key prefix
    if prefixed:
        return sorted(prefixed)
    raise FileNotFoundError(f"no such file, directory or prefix: {path}")


# COCO annotation files that are not instances files (captions, keypoints, image lists, panoptic, stuff)
COCO_OTHER_JSON = re.compile(r"^(captions|person_keypoints|image_info|panoptic|stuff)([_.-]|$)", re.I)
COCO_NEEDS = ("a COCO instances JSON: input=<coco>/annotations/instances_<split>.json, or a directory in COCO's "
              "layout (annotations/instances_<split>.json, images in <split>/); captions go in "
              "source.coco_captions (or =auto), images in source.coco_images")


def coco_instances_files(files: list[str], input_url: str) -> list[str]:
    """The instances files among the JSON files of a COCO directory: captions, keypoints and the other
    annotation files of COCO's layout are not shards (read as one they would give wrong rows)."""
    keep = [f for f in files if not COCO_OTHER_JSON.match(posixpath.basename(f))]
    if not keep:
        found = ", ".join(sorted(posixpath.basename(f) for f in files)[:5]) or "no .json files"
        raise SourceError(f"no COCO instances file at {input_url} (found {found}): dcam needs {COCO_NEEDS}")
    return keep


def _files_under(fs, root: str) -> list[str]:
    """Files under `root`, without hidden/underscore names and without dcam run directories."""
    found = fs.find(root)
    runs = run_dirs_among(found)
    out = []
    for p in found:
        rel = p[len(root.rstrip("/")):].lstrip("/") if p.startswith(root.rstrip("/")) else posixpath.basename(p)
        if not any(part.startswith((".", "_")) for part in rel.split("/")) and \
                not any(p.startswith(r + "/") for r in runs):
            out.append(p)
    return sorted(out)


def _enclosing_run_dir(fs, path: str) -> str | None:
    """The dcam run directory that `path` (a directory, file or glob) is or lies in, looking at
    it and up to two parents (a run's results/ folder and one of its result files)."""
    d = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    d = d.rstrip("/") if fs.isdir(d) else posixpath.dirname(d.rstrip("/"))
    for _ in range(3):
        if d in ("", "/"):
            return None
        if fs.exists(f"{d}/{MANIFEST}"):
            if is_run_dir({posixpath.basename(n.rstrip("/")) for n in fs.ls(d, detail=False)}):
                return d
        d = posixpath.dirname(d)
    return None


def _detect_format(files: list[str], input_url: str) -> str:
    """The format fmt="auto" resolves to (input_url is only used, already redacted, in messages)."""
    exts = {fmt for fmt, ends in EXTENSIONS.items() for f in files if f.lower().endswith(ends)}
    if "webdataset" in exts:
        return "webdataset"
    main = exts & {"parquet", "jsonl", "csv"}
    if len(main) > 1:
        raise SourceError(f"ambiguous input at {input_url}: found {sorted(main)} files; set the format explicitly")
    if main:
        return main.pop()
    if "coco" in exts:
        return "coco"
    raise SourceError(f"cannot detect the input format at {input_url} (no .parquet/.tar/.jsonl/.csv/.json files)")


def _sniff_parquet(fs, path: str) -> str:
    """dcam parquet (image/image_uri columns) or img2dataset parquet (url column), from the schema."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        names = set(pq.read_schema(f).names)
    if names & {"image", "image_uri"}:
        return "parquet"
    return "img2dataset_parquet" if "url" in names else "parquet"
