"""Input shards: listing (`list_shards`), row counts (`count_rows`) and streaming readers
(`read_shard`) that turn every supported input format into *raw rows* (docs/ARCHITECTURE.md).

Formats (one ShardSpec = one file):
  parquet              dcam's own layout (`dcam synth`): id, image (bytes) or image_uri, prompt,
                       optional response, mask (PNG bytes), objects (JSON string).
  img2dataset_parquet  img2dataset's parquet: key, url, caption, status, error_message, optional jpg/png/webp
                       bytes. Rows whose status is not "success" become error rows (kind "source_status").
  webdataset           img2dataset tar shards: <key>.jpg|.png|.webp + <key>.txt + <key>.json (optionally
                       <key>.mask.png + <key>.objects.json). Read with tarfile in streaming mode.
  jsonl, csv           manifests: image_uri (or url/image) + prompt + optional response/id/objects. A relative
                       image_uri is resolved against the manifest's own directory.
  coco                 one instances JSON; images under `source.coco_images` (default: the JSON's
                       directory); masks rasterised from polygons/RLE; `source.coco_captions` (a captions
                       JSON) gives `response` (first caption of each image, file order).

Row contract details decided here:
  * Rows come out in file order; row_index is 0..n-1 and n == count_rows(spec) (error rows included).
  * A row that cannot be parsed becomes an error row (status "error", `error`, and an extra `error_kind`
    column); readers never raise for a bad row. Shard-level failures (missing file, corrupt footer/tar,
    malformed CSV quoting) raise SourceError from both count_rows and read_shard.
  * Text fields stored as bytes (a binary parquet column, tar members, jsonl lines, csv) are decoded as
    strict UTF-8; invalid UTF-8 makes the row an error row with error_kind "encoding" (no silent
    replacement: a replaced prompt would change what the model is asked).
  * Duplicate ids: the first occurrence of an id in a shard is kept; every later occurrence becomes an
    error row with error_kind "duplicate_id" naming the first row_index. Ids are not compared across shards.
  * A missing id gets a deterministic one: "<shard_key>-<row_index>".
  * Error rows carry no image/mask payload (image=None, mask=None) but keep id/prompt where known.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from PIL import Image, ImageDraw

from dcam.pipeline.storage import (StorageError, describe_error, join_url, open_fs, redact, retry_settings,
                              scheme_of, secrets_of, with_retries)

FORMATS = ("parquet", "webdataset", "img2dataset_parquet", "jsonl", "csv", "coco")
RAW_COLUMNS = ("id", "shard", "row_index", "image", "image_uri", "prompt", "response", "mask", "objects",
               "explain", "status", "error", "error_kind")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_OBJECT_ID = 65535
_EXTS = {"parquet": (".parquet",), "img2dataset_parquet": (".parquet",), "webdataset": (".tar",),
         "jsonl": (".jsonl", ".ndjson"), "csv": (".csv",), "coco": (".json",)}
# per-format defaults for (id field, prompt field, response field); source.* overrides them
_FIELDS = {"parquet": ("id", "prompt", "response"), "img2dataset_parquet": ("key", None, "caption"),
           "webdataset": ("__key__", None, "txt"), "jsonl": ("id", "prompt", "response"),
           "csv": ("id", "prompt", "response"), "coco": (None, None, None)}
_IMAGE_URI_FIELDS = ("image_uri", "url", "image_url", "image")
_BLOCK = 8 * 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")  # sequential read-ahead for tar/jsonl/csv streams


class SourceError(StorageError):
    """A whole shard cannot be listed, counted or read (message redacted)."""


class RowError(Exception):
    """One row cannot be parsed; becomes an error row of kind `kind`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ShardSpec:
    """One input file. `shard_key` is a filesystem-safe, deterministic name for per-shard outputs."""
    url: str
    format: str
    shard_key: str


def safe_name(text: str, max_len: int = 64) -> str:
    """`text` reduced to [A-Za-z0-9._-], no '..', no leading dot/dash, at most max_len chars (the tail)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))
    s = re.sub(r"\.{2,}", "_", s)
    s = s[-max_len:].strip("._-")
    return s or "x"


def make_shard_key(url: str) -> str:
    """Deterministic key for a shard URL: sanitised path tail + '-' + 10 hex of sha256(url)."""
    path = url.split("://", 1)[-1]
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe_name(path)}-{digest}"


def shard_spec(url: str, fmt: str) -> ShardSpec:
    """ShardSpec for one known file (no listing)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; known: {FORMATS}")
    return ShardSpec(url, fmt, make_shard_key(url))


# ----------------------------------------------------------------------------------------------- listing

def list_shards(input_url: str, fmt: str = "auto", storage_options: dict | None = None) -> list[ShardSpec]:
    """Shards under a file URL, a directory/prefix (recursive) or a glob, sorted by URL.

    Names starting with '.' or '_' (_SUCCESS, .DS_Store, _temporary/) are skipped when expanding.
    fmt="auto" picks by extension: .tar -> webdataset (img2dataset's .parquet/.json sidecars ignored),
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
    except Exception as e:  # noqa: BLE001 - reported as a shard-level error
        raise SourceError(f"cannot list {redact_url(input_url, secrets)}: {describe_error(e, secrets)}") from None
    chosen = fmt if fmt != "auto" else _detect_format(files, redact_url(input_url, secrets))
    files = [f for f in files if f.lower().endswith(_EXTS[chosen]) and not f.endswith("_stats.json")]
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


def redact_url(url: str, secrets) -> str:
    """`url` (or any message) with secrets and URL user-info removed."""
    return redact(url, secrets)


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


def _files_under(fs, root: str) -> list[str]:
    out = []
    for p in fs.find(root):
        rel = p[len(root.rstrip("/")):].lstrip("/") if p.startswith(root.rstrip("/")) else posixpath.basename(p)
        if not any(part.startswith((".", "_")) for part in rel.split("/")):
            out.append(p)
    return sorted(out)


def _detect_format(files: list[str], input_url: str) -> str:
    """The format fmt="auto" resolves to (input_url is only used, already redacted, in messages)."""
    exts = {fmt for fmt, ends in _EXTS.items() for f in files if f.lower().endswith(ends)}
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


# ----------------------------------------------------------------------------------------------- context

@dataclass
class _Ctx:
    spec: ShardSpec
    storage_options: dict = field(repr=False)
    source: dict
    fs: Any = field(default=None, repr=False)
    path: str = ""
    secrets: list = field(default_factory=list, repr=False)

    @classmethod
    def make(cls, spec: ShardSpec, storage_options: dict | None, source: dict | None) -> "_Ctx":
        fs, path = open_fs(spec.url, storage_options)
        return cls(spec, dict(storage_options or {}), dict(source or {}), fs, path, secrets_of(storage_options))

    def open(self, block_size: int | None = None):
        """The shard as a binary file object (opened once, with retries)."""
        attempts, base = retry_settings(self.storage_options)
        kw = {"block_size": block_size} if block_size and scheme_of(self.spec.url) != "file" else {}
        return with_retries(lambda: self.fs.open(self.path, "rb", **kw), attempts, base, secrets=self.secrets)

    @contextlib.contextmanager
    def open_stream(self):
        """Sequential buffered reader: fsspec's own readline copies a whole block per line."""
        with self.open(_BLOCK) as f:
            yield io.BufferedReader(f, buffer_size=1 << 20) if not isinstance(f, io.BufferedIOBase) else f

    def field_names(self) -> tuple:
        """(id, prompt, response) field names after `source.*` overrides (None = not taken from data,
        "auto" or absent = the format's default: e.g. webdataset takes the response from `txt`)."""
        d_id, d_prompt, d_resp = _FIELDS[self.spec.format]
        pick = lambda key, d: self.source[key] if self.source.get(key, "auto") != "auto" else d  # noqa: E731
        return pick("id_field", d_id), pick("prompt_field", d_prompt), pick("response_field", d_resp)

    def shard_dir(self) -> str:
        return self.spec.url.rsplit("/", 1)[0] if "/" in self.spec.url else "."


def _shard_error(ctx: _Ctx, e: BaseException, doing: str) -> SourceError:
    return SourceError(f"cannot {doing} {redact_url(ctx.spec.url, ctx.secrets)} ({ctx.spec.format}): "
                       f"{describe_error(e, ctx.secrets)}")


# ----------------------------------------------------------------------------------------------- public

def count_rows(spec: ShardSpec, storage_options: dict | None = None, source: dict | None = None) -> int:
    """Number of raw rows read_shard(spec) yields. Parquet: footer metadata only. Tar/jsonl/csv: one
    sequential pass over the file (no payload decoding). COCO: loads the JSON."""
    ctx = _Ctx.make(spec, storage_options, source)
    try:
        if spec.format in ("parquet", "img2dataset_parquet"):
            import pyarrow.parquet as pq

            with ctx.open() as f:
                return pq.ParquetFile(f).metadata.num_rows
        if spec.format == "coco":
            return len(_coco_images(_load_json(ctx, ctx.path)))
        counter = {"webdataset": _tar_groups, "jsonl": _jsonl_lines, "csv": _csv_records}[spec.format]
        return sum(1 for _ in counter(ctx, payload=False))
    except (SourceError, RowError):
        raise
    except Exception as e:  # noqa: BLE001 - shard-level failure, reported cleanly
        raise _shard_error(ctx, e, "count rows of") from None


def read_shard(spec: ShardSpec, storage_options: dict | None = None, source: dict | None = None
               ) -> Iterator[dict]:
    """Stream the shard's raw rows (RAW_COLUMNS) in file order; see the module docstring for the rules.

    `source` is the config's `source` section: id_field, prompt_field, response_field (None = do not take
    it from the data), image_field, coco_images, coco_captions, batch_rows, max_member_bytes.
    Empty prompts stay empty here: DecodeStage applies `source.default_prompt` and records the note.
    """
    ctx = _Ctx.make(spec, storage_options, source)
    reader = {"parquet": _parquet_records, "img2dataset_parquet": _parquet_records, "webdataset": _tar_records,
              "jsonl": _jsonl_records, "csv": _csv_rows, "coco": _coco_records}[spec.format]
    seen: dict[str, int] = {}
    try:
        for row_index, rec in enumerate(reader(ctx)):
            yield _finish(ctx, row_index, rec, seen)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - shard-level failure (a bad row never gets here)
        raise _shard_error(ctx, e, "read") from None


def _finish(ctx: _Ctx, row_index: int, rec: dict, seen: dict) -> dict:
    """Complete one record into a raw row: defaults, generated id, duplicate detection."""
    row = {c: rec.get(c) for c in RAW_COLUMNS}
    row.update(shard=ctx.spec.url, row_index=row_index)
    row["id"] = row["id"] if row["id"] not in (None, "") else f"{ctx.spec.shard_key}-{row_index}"
    if row["status"] != "error":
        row.update(status="ok", error=None, error_kind=None)
        if row["image"] is None and not row["image_uri"]:
            row.update(status="error", error_kind="missing_image",
                       error="row has neither image bytes nor an image_uri")
    if row["id"] in seen:
        row.update(status="error", error_kind="duplicate_id",
                   error=f"duplicate id {row['id']!r} in shard (first seen at row_index {seen[row['id']]})")
    else:
        seen[row["id"]] = row_index
    if row["status"] == "error":
        row.update(image=None, mask=None)
        row["error"] = redact_url(row["error"], ctx.secrets)
    return row


def _error_rec(e: RowError, rec_id: Any = None, prompt: Any = None) -> dict:
    return {"id": rec_id if isinstance(rec_id, str) else None, "prompt": prompt if isinstance(prompt, str) else None,
            "status": "error", "error": str(e), "error_kind": e.kind}


# ----------------------------------------------------------------------------------------------- field helpers

def as_text(value: Any, name: str) -> str | None:
    """A text field as str: bytes are strict UTF-8 (RowError 'encoding' otherwise); numbers -> str."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("encoding", f"{name}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") \
                from None
    if isinstance(value, str):
        bad = _SURROGATE.search(value)  # surrogateescape'd bytes (csv) or lone surrogates: not UTF-8
        if bad:
            code = ord(bad.group())
            what = f"byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"lone surrogate U+{code:04X}"
            raise RowError("encoding", f"{name}: not valid UTF-8 ({what} at offset {bad.start()})")
        return value
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return str(value)
    raise RowError("parse", f"{name}: expected text, got {type(value).__name__}")


def objects_json(value: Any) -> str | None:
    """The objects field as a JSON string holding a list (RowError 'objects' if it is not one)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), separators=(",", ":"), default=_json_default)
    text = as_text(value, "objects")
    if text is None or not text.strip():
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("objects", f"objects: invalid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(parsed, list):
        raise RowError("objects", f"objects: expected a JSON list, got {type(parsed).__name__}")
    return text


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _as_bytes(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise RowError("parse", f"{name}: expected bytes, got {type(value).__name__}")


def _record_row(rec: dict, ctx: _Ctx) -> dict:
    """Map a flat record (parquet row, jsonl object, csv row) onto raw-row fields."""
    id_f, prompt_f, resp_f = ctx.field_names()
    row = {"id": as_text(rec.get(id_f), "id") if id_f else None,
           "prompt": as_text(rec.get(prompt_f), "prompt") if prompt_f else None,
           "response": as_text(rec.get(resp_f), "response") if resp_f else None,
           "mask": _as_bytes(rec.get("mask"), "mask"), "objects": objects_json(rec.get("objects")),
           "explain": _explain_field(rec.get(ctx.source.get("explain_field") or "explain"))}
    row["image"], row["image_uri"] = _image_fields(rec, ctx)
    return row


def _explain_field(value: Any) -> str | None:
    """Words to explain, as a JSON list string (from a list, a JSON string or 'w1,w2')."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([as_text(v, "explain") for v in value])
    text = as_text(value, "explain")
    if text is None or not text.strip():
        return None
    if text.lstrip().startswith("["):
        return json.dumps([str(w) for w in json.loads(text)])
    return json.dumps([w.strip() for w in text.split(",") if w.strip()])


def _image_fields(rec: dict, ctx: _Ctx) -> tuple[bytes | None, str | None]:
    """(image bytes, image_uri): non-empty bytes win, then a URI (relative ones resolved against the
    shard's directory), then empty bytes (decode reports a zero-byte image)."""
    image = rec.get(ctx.source.get("image_field", "image"))
    if isinstance(image, dict):  # Hugging Face datasets Image feature: {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
    candidates = [image] + [rec.get(k) for k in _IMAGE_URI_FIELDS]
    uri = next((u for u in candidates if isinstance(u, str) and u.strip()), None)
    if data:
        return data, None
    if uri:
        uri = as_text(uri.strip(), "image_uri")
        return None, uri if "://" in uri or uri.startswith("/") else join_url(ctx.shard_dir(), uri)
    return data, None


def _guarded(ctx: _Ctx, row_id: Any, fn, *args) -> dict:
    """fn(*args), or an error row: RowError keeps its kind, anything else is kind "parse"."""
    try:
        return fn(*args)
    except RowError as e:
        return _error_rec(e, row_id)
    except Exception as e:  # noqa: BLE001 - a malformed row must never abort the shard
        return _error_rec(RowError("parse", f"cannot parse row: {describe_error(e, ctx.secrets)}"), row_id)


def _safe_record_row(rec: dict, ctx: _Ctx) -> dict:
    id_f = ctx.field_names()[0]
    rid = rec.get(id_f) if id_f else None
    rid = rid if isinstance(rid, str) else (str(rid) if isinstance(rid, int) else None)
    return _guarded(ctx, rid, _record_row, rec, ctx)


# ----------------------------------------------------------------------------------------------- parquet

def _parquet_records(ctx: _Ctx) -> Iterator[dict]:
    """Stream record batches (pyarrow iter_batches) reading only the columns a raw row needs."""
    import pyarrow.parquet as pq

    with ctx.open() as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        id_f, prompt_f, resp_f = ctx.field_names()
        wanted = {id_f, prompt_f, resp_f, ctx.source.get("image_field", "image"), "mask", "objects", ctx.source.get("explain_field") or "explain",
                  "status", "error_message", *_IMAGE_URI_FIELDS, "jpg", "png", "webp"}
        cols = sorted(c for c in wanted if c in names)
        batch_rows = int(ctx.source.get("batch_rows", 256))
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            for rec in batch.to_pylist():
                if ctx.spec.format == "img2dataset_parquet":
                    yield _guarded(ctx, rec.get("key") if isinstance(rec.get("key"), str) else None,
                                   _img2dataset_row, rec, ctx)
                else:
                    yield _safe_record_row(rec, ctx)


def _img2dataset_row(rec: dict, ctx: _Ctx) -> dict:
    """img2dataset parquet row: failed downloads are error rows; stored bytes beat the URL."""
    row = _safe_record_row(rec, ctx)
    if row.get("status") == "error":
        return row
    status = rec.get("status")
    if status is not None and status != "success":
        msg = rec.get("error_message") or ""
        return {**row, "status": "error", "error_kind": "source_status",
                "error": f"img2dataset status {status!r}: {msg}".rstrip(": ")}
    data = next((rec[k] for k in ("jpg", "png", "webp") if rec.get(k)), None)
    if data is not None:
        row.update(image=bytes(data), image_uri=None)
    return row


# ----------------------------------------------------------------------------------------------- webdataset

def _split_member(name: str) -> tuple[str, str]:
    """'dir/000012.mask.png' -> ('dir/000012', 'mask.png') (webdataset's first-dot rule)."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


def _tar_groups(ctx: _Ctx, payload: bool = True) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes or RowError}) per run of consecutive members sharing a key (streaming)."""
    limit = int(ctx.source.get("max_member_bytes", 64 * 1024 * 1024))
    with ctx.open(_BLOCK) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        key, group = None, {}
        for m in tf:
            if not m.isfile():
                continue
            k, ext = _split_member(m.name)
            if key is not None and k != key:
                yield key, group
                group = {}
            key = k
            if not payload:
                continue
            if m.size > limit:
                group[ext] = RowError("too_large", f"tar member {m.name} is {m.size} bytes > max_member_bytes {limit}")
            else:
                group[ext] = tf.extractfile(m).read()
        if key is not None:
            yield key, group


def _tar_records(ctx: _Ctx) -> Iterator[dict]:
    for key, members in _tar_groups(ctx):
        yield _guarded(ctx, key, _tar_row, key, members, ctx)


def _tar_row(key: str, members: dict, ctx: _Ctx) -> dict:
    for v in members.values():
        if isinstance(v, RowError):
            raise v
    rec: dict[str, Any] = {"__key__": key}
    if "json" in members:
        try:
            meta = json.loads(as_text(members["json"], f"{key}.json"))
        except json.JSONDecodeError as e:
            raise RowError("parse", f"{key}.json: invalid JSON ({e.msg} at char {e.pos})") from None
        rec.update(meta if isinstance(meta, dict) else {})
    rec.update({ext: v for ext, v in members.items() if ext not in IMAGE_EXTS and ext != "json"})
    id_f, prompt_f, resp_f = ctx.field_names()
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        raise RowError("missing_image", f"sample {key!r} has no image member ({'/'.join(IMAGE_EXTS)})")
    return {"id": as_text(rec.get(id_f), "id") if id_f else None, "image": members[image_ext],
            "prompt": as_text(rec.get(prompt_f), prompt_f) if prompt_f else None,
            "response": as_text(rec.get(resp_f), resp_f) if resp_f else None,
            "mask": members.get("mask.png"), "objects": objects_json(members.get("objects.json"))}


# ----------------------------------------------------------------------------------------------- jsonl / csv

def _jsonl_lines(ctx: _Ctx, payload: bool = True) -> Iterator[bytes]:
    """Non-blank lines (bytes), streamed; a UTF-8 BOM on the first line is dropped."""
    with ctx.open_stream() as f:
        first = True
        for line in f:
            if first:
                line, first = line.removeprefix(b"\xef\xbb\xbf"), False
            if line.strip():
                yield line


def _jsonl_records(ctx: _Ctx) -> Iterator[dict]:
    for line in _jsonl_lines(ctx):
        try:
            obj = json.loads(as_text(line, "line"))
        except RowError as e:
            yield _error_rec(e)
            continue
        except json.JSONDecodeError as e:
            yield _error_rec(RowError("parse", f"invalid JSON line ({e.msg} at char {e.pos})"))
            continue
        if not isinstance(obj, dict):
            yield _error_rec(RowError("parse", f"JSON line is a {type(obj).__name__}, expected an object"))
            continue
        yield _safe_record_row(obj, ctx)


def _csv_records(ctx: _Ctx, payload: bool = True) -> Iterator[dict]:
    """csv.DictReader rows; bytes that are not UTF-8 survive as surrogates (flagged per row later)."""
    with ctx.open_stream() as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        yield from csv.DictReader(text)


def _csv_rows(ctx: _Ctx) -> Iterator[dict]:
    for rec in _csv_records(ctx):
        if None in rec:
            yield _error_rec(RowError("parse", f"CSV row has {len(rec[None])} more field(s) than the header"))
            continue
        yield _safe_record_row({k: (v if v != "" else None) for k, v in rec.items()}, ctx)


# ----------------------------------------------------------------------------------------------- coco

def _load_json(ctx: _Ctx, path: str, fs=None) -> Any:
    """A whole JSON document (COCO files are loaded at once: split huge annotation files for parallelism)."""
    fs = fs or ctx.fs
    attempts, base = retry_settings(ctx.storage_options)
    data = with_retries(lambda: fs.cat_file(path), attempts, base, secrets=ctx.secrets)
    return json.loads(data)


def _coco_images(doc: Any) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise SourceError("not a COCO instances file: no 'images' list")
    return doc["images"]


def _coco_captions(ctx: _Ctx) -> dict:
    url = ctx.source.get("coco_captions")
    if not url:
        return {}
    fs, path = open_fs(url, ctx.storage_options)
    first: dict = {}
    for ann in _load_json(ctx, path, fs).get("annotations", []):
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and isinstance(ann.get("image_id"),
                                                                                         (int, str)):
            first.setdefault(ann.get("image_id"), ann["caption"].strip())
    return first


def _coco_records(ctx: _Ctx) -> Iterator[dict]:
    doc = _load_json(ctx, ctx.path)
    images = _coco_images(doc)
    cats = {c.get("id"): str(c.get("name", "")) for c in doc.get("categories", []) if isinstance(c, dict)}
    anns: dict[Any, list] = defaultdict(list)
    for a in doc.get("annotations", []):
        if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str)):
            anns[a["image_id"]].append(a)
    captions = _coco_captions(ctx)
    prefix = ctx.source.get("coco_images") or ctx.shard_dir()
    for img in images:
        img_id = img.get("id") if isinstance(img, dict) else None
        key = img_id if isinstance(img_id, (int, str)) else None
        yield _guarded(ctx, None if key is None else str(key), _coco_row, img, anns.get(key, []), cats,
                       captions.get(key), prefix)


def _coco_row(img: Any, anns: list, cats: dict, caption: str | None, prefix: str) -> dict:
    if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
        raise RowError("parse", "COCO image entry without id/file_name")
    try:
        h, w = int(img["height"]), int(img["width"])
    except (KeyError, TypeError, ValueError):
        raise RowError("parse", f"COCO image {img['id']}: missing or bad height/width") from None
    if len(anns) > MAX_OBJECT_ID:
        raise RowError("mask", f"COCO image {img['id']}: {len(anns)} annotations > {MAX_OBJECT_ID}")
    objects, masks = [], []
    for k, a in enumerate(anns, start=1):
        if a.get("category_id") not in cats:
            raise RowError("parse", f"annotation {a.get('id')}: unknown category_id {a.get('category_id')}")
        try:
            masks.append((k, bool(a.get("iscrowd")), segmentation_mask(a.get("segmentation"), h, w)))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise RowError("mask", f"annotation {a.get('id')}: cannot rasterise segmentation ({e})") from None
        name = cats[a["category_id"]]
        objects.append({"id": k, "words": name.lower().split(), "category": name,
                        "bbox": coco_bbox(a.get("bbox"), h, w), "coco_id": a.get("id"),
                        "iscrowd": bool(a.get("iscrowd"))})
    return {"id": str(img["id"]), "image_uri": join_url(prefix, str(img["file_name"])), "response": caption,
            "objects": json.dumps(objects, separators=(",", ":")),
            "mask": paint_mask(masks, h, w) if masks else None}


def coco_bbox(bbox: Any, h: int, w: int) -> list[int] | None:
    """COCO [x, y, width, height] (float) -> dcam [x0, y0, x1, y1] ints (x1/y1 exclusive), clipped."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    x, y, bw, bh = (float(v) for v in bbox)
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    return [x0, y0, min(w, max(x0, int(np.ceil(x + bw)))), min(h, max(y0, int(np.ceil(y + bh))))]


def paint_mask(masks: list[tuple[int, bool, np.ndarray]], h: int, w: int) -> bytes:
    """PNG of the id mask: crowd regions first, then instances in annotation order (later ones win
    where they overlap). 8-bit PNG when ids fit, else 16-bit."""
    out = np.zeros((h, w), np.uint16)
    for k, _crowd, m in sorted(masks, key=lambda t: (not t[1], t[0])):
        out[m] = k
    img = Image.fromarray(out.astype(np.uint8)) if out.max(initial=0) <= 255 else Image.fromarray(out)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def segmentation_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of a COCO segmentation: polygon list, RLE (compressed or counts), or list of RLEs."""
    if isinstance(seg, dict):
        m = rle_decode(seg)
        if m.shape != (h, w):
            raise ValueError(f"RLE size {list(m.shape)} != image size {[h, w]}")
        return m
    if not isinstance(seg, list):
        raise ValueError(f"unsupported segmentation type {type(seg).__name__}")
    out = np.zeros((h, w), bool)
    for part in seg:
        out |= segmentation_mask(part, h, w) if isinstance(part, dict) else polygon_mask(part, h, w)
    return out


SUPERSAMPLE = 4


def polygon_mask(poly: list, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of one polygon [x1, y1, x2, y2, ...] in COCO pixel coordinates (pixel (i, j)
    spans [j, j+1) x [i, i+1)). A pixel is inside when more than half of its 4x4 sub-samples are: the
    polygon is filled with PIL ImageDraw on a 4x supersampled canvas cropped to its bounding box."""
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((h, w), bool)
    if len(pts) < 3 or not np.isfinite(pts).all():
        return out
    x0, y0 = max(0, int(np.floor(pts[:, 0].min()))), max(0, int(np.floor(pts[:, 1].min())))
    x1, y1 = min(w, int(np.ceil(pts[:, 0].max()))), min(h, int(np.ceil(pts[:, 1].max())))
    if x1 <= x0 or y1 <= y0:
        return out
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    local = [((x - x0) * s, (y - y0) * s) for x, y in pts]
    ImageDraw.Draw(canvas).polygon(local, fill=1)
    sub = np.asarray(canvas, dtype=np.uint8).reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3))
    out[y0:y1, x0:x1] = sub > (s * s) // 2
    return out


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString, LEB128-like, delta-coded)."""
    b = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(b):
        x, k, more = 0, 0, True
        while more:
            if p >= len(b):
                raise ValueError("truncated RLE string")
            c = b[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """Boolean (h, w) mask of a COCO RLE {size: [h, w], counts: [...] or compressed string}.
    Runs alternate 0/1 starting with 0, over the image in column-major (Fortran) order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h * w} (or a run is negative)")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()
