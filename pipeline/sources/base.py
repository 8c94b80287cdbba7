"""What every format reader shares: constants, errors, the shard spec and context, the raw-row
field helpers (strict text, objects JSON, image bytes vs URI) and the completion of a record into a
raw row (defaults, generated ids, duplicate ids). See the package docstring for the row contract."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dcam.actors.errors import KindedError
from dcam.pipeline.storage import (
    StorageError,
    describe_error,
    join_url,
    open_fs,
    redact,
    retry_settings,
    scheme_of,
    secrets_of,
    with_retries,
)

FORMATS = ("parquet", "webdataset", "img2dataset_parquet", "jsonl", "csv", "coco")
RAW_COLUMNS = ("id", "shard", "row_index", "image", "image_uri", "prompt", "response", "mask", "objects",
               "explain", "status", "error", "error_kind")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_OBJECT_ID = 65535
EXTENSIONS = {"parquet": (".parquet",), "img2dataset_parquet": (".parquet",), "webdataset": (".tar",),
         "jsonl": (".jsonl", ".ndjson"), "csv": (".csv",), "coco": (".json",)}
# per-format defaults for (id field, prompt field, response field); source.* overrides them
DEFAULT_FIELDS = {"parquet": ("id", "prompt", "response"), "img2dataset_parquet": ("key", None, "caption"),
           "webdataset": ("__key__", None, "txt"), "jsonl": ("id", "prompt", "response"),
           "csv": ("id", "prompt", "response"), "coco": (None, None, None)}
IMAGE_URI_FIELDS = ("image_uri", "url", "image_url", "image")
STREAM_BLOCK = 8 * 1024 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")  # sequential read-ahead for tar/jsonl/csv streams


class SourceError(StorageError):
    """A whole shard cannot be listed, counted or read (message redacted)."""


class RowError(KindedError):
    """One row cannot be parsed; becomes an error row of kind `kind`."""


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


def redact_url(url: str, secrets) -> str:
    """`url` (or any message) with secrets and URL user-info removed."""
    return redact(url, secrets)


@dataclass
class ShardContext:
    spec: ShardSpec
    storage_options: dict = field(repr=False)
    source: dict
    fs: Any = field(default=None, repr=False)
    path: str = ""
    secrets: list = field(default_factory=list, repr=False)

    @classmethod
    def make(cls, spec: ShardSpec, storage_options: dict | None, source: dict | None) -> "ShardContext":
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
        with self.open(STREAM_BLOCK) as f:
            yield io.BufferedReader(f, buffer_size=1 << 20) if not isinstance(f, io.BufferedIOBase) else f

    def field_names(self) -> tuple:
        """(id, prompt, response) field names after `source.*` overrides (None = not taken from data,
        "auto" or absent = the format's default: e.g. webdataset takes the response from `txt`)."""
        d_id, d_prompt, d_resp = DEFAULT_FIELDS[self.spec.format]
        pick = lambda key, d: self.source[key] if self.source.get(key, "auto") != "auto" else d  # noqa: E731
        return pick("id_field", d_id), pick("prompt_field", d_prompt), pick("response_field", d_resp)

    def shard_dir(self) -> str:
        return self.spec.url.rsplit("/", 1)[0] if "/" in self.spec.url else "."


def shard_error(ctx: ShardContext, e: BaseException, doing: str) -> SourceError:
    return SourceError(f"cannot {doing} {redact_url(ctx.spec.url, ctx.secrets)} ({ctx.spec.format}): "
                       f"{describe_error(e, ctx.secrets)}")


def finish_row(ctx: ShardContext, row_index: int, rec: dict, seen: dict) -> dict:
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


def error_record(e: RowError, rec_id: Any = None, prompt: Any = None) -> dict:
    return {"id": rec_id if isinstance(rec_id, str) else None, "prompt": prompt if isinstance(prompt, str) else None,
            "status": "error", "error": str(e), "error_kind": e.kind}


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


def as_bytes(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise RowError("parse", f"{name}: expected bytes, got {type(value).__name__}")


def record_row(rec: dict, ctx: ShardContext) -> dict:
    """Map a flat record (parquet row, jsonl object, csv row) onto raw-row fields."""
    id_f, prompt_f, resp_f = ctx.field_names()
    row = {"id": as_text(rec.get(id_f), "id") if id_f else None,
           "prompt": as_text(rec.get(prompt_f), "prompt") if prompt_f else None,
           "response": as_text(rec.get(resp_f), "response") if resp_f else None,
           "mask": as_bytes(rec.get("mask"), "mask"), "objects": objects_json(rec.get("objects")),
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


def _image_fields(rec: dict, ctx: ShardContext) -> tuple[bytes | None, str | None]:
    """(image bytes, image_uri): non-empty bytes win, then a URI (relative ones resolved against the
    shard's directory), then empty bytes (decode reports a zero-byte image)."""
    image = rec.get(ctx.source.get("image_field", "image"))
    if isinstance(image, dict):  # Hugging Face datasets Image feature: {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else None
    candidates = [image] + [rec.get(k) for k in IMAGE_URI_FIELDS]
    uri = next((u for u in candidates if isinstance(u, str) and u.strip()), None)
    if data:
        return data, None
    if uri:
        uri = as_text(uri.strip(), "image_uri")
        return None, uri if "://" in uri or uri.startswith("/") else join_url(ctx.shard_dir(), uri)
    return data, None


def img2dataset_status_error(status: Any, message: Any) -> str:
    """The `error` of a row img2dataset failed to download (kind "source_status"), one wording for its
    parquet output and for the side parquet of its tar output."""
    return f"img2dataset status {status!r}: {message or ''}".rstrip(": ")


def guarded(ctx: ShardContext, row_id: Any, fn, *args) -> dict:
    """fn(*args), or an error row: RowError keeps its kind, anything else is kind "parse"."""
    try:
        return fn(*args)
    except RowError as e:
        return error_record(e, row_id)
    except Exception as e:  # noqa: BLE001 - a malformed row must never abort the shard
        return error_record(RowError("parse", f"cannot parse row: {describe_error(e, ctx.secrets)}"), row_id)


def record_row_or_error(rec: dict, ctx: ShardContext) -> dict:
    id_f = ctx.field_names()[0]
    rid = rec.get(id_f) if id_f else None
    rid = rid if isinstance(rid, str) else (str(rid) if isinstance(rid, int) else None)
    return guarded(ctx, rid, record_row, rec, ctx)
