"""img2dataset's WebDataset tar shards: <key>.jpg|.png|.webp + <key>.txt + <key>.json (optionally
<key>.mask.png + <key>.objects.json), read with tarfile in streaming mode.

img2dataset writes a side parquet beside each tar (same stem: 00000.tar + 00000.parquet) with one row
per URL it tried (key, url, caption, status, error_message, ...); the URLs that failed have no tar
member. When that file is present and has a `status` column, every row whose status is neither
"success" nor null becomes one error row (kind "source_status"), after the tar's rows, exactly as
img2dataset's parquet output format gives them: a failed download is never silently lost. An
unreadable side parquet fails the shard (SourceError naming it)."""
from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Iterator

from dcam.pipeline.sources.base import (
    IMAGE_EXTS,
    STREAM_BLOCK,
    RowError,
    ShardContext,
    SourceError,
    as_text,
    guarded,
    img2dataset_status_error,
    objects_json,
    redact_url,
)
from dcam.pipeline.storage import describe_error, retry_settings, with_retries


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000012.mask.png' -> ('dir/000012', 'mask.png') (webdataset's first-dot rule)."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


def tar_groups(ctx: ShardContext, payload: bool = True) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes or RowError}) per run of consecutive members sharing a key (streaming)."""
    limit = int(ctx.source.get("max_member_bytes", 64 * 1024 * 1024))
    with ctx.open(STREAM_BLOCK) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
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


def read_webdataset(ctx: ShardContext) -> Iterator[dict]:
    for key, members in tar_groups(ctx):
        yield guarded(ctx, key, _tar_row, key, members, ctx)
    for rec in failed_downloads(ctx):
        key = rec.get("key")
        yield guarded(ctx, key if isinstance(key, str) else None, _failed_download_row, rec, ctx)


def count_webdataset(ctx: ShardContext) -> int:
    """Rows read_webdataset yields: one per sample in the tar plus one per failed URL of the side parquet."""
    return sum(1 for _ in tar_groups(ctx, payload=False)) + sum(1 for _ in failed_downloads(ctx))


def side_parquet_path(ctx: ShardContext) -> str:
    """Where img2dataset puts the tar's side parquet: the same path with .parquet for .tar."""
    stem = ctx.path[:-4] if ctx.path.lower().endswith(".tar") else ctx.path
    return stem + ".parquet"


SIDE_COLUMNS = ("key", "url", "caption", "status", "error_message")


def failed_downloads(ctx: ShardContext) -> Iterator[dict]:
    """Records (SIDE_COLUMNS present in the file) of the side parquet's rows whose status is not
    "success" (null: not a failure), in file order; nothing when there is no side parquet or it has no
    `status` column (then it is not img2dataset's). An unreadable side parquet fails the shard."""
    import pyarrow.parquet as pq

    path = side_parquet_path(ctx)
    attempts, base = retry_settings(ctx.storage_options)
    if not with_retries(lambda: ctx.fs.exists(path), attempts, base, secrets=ctx.secrets):
        return
    try:
        with with_retries(lambda: ctx.fs.open(path, "rb"), attempts, base, secrets=ctx.secrets) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if "status" not in names:
                return
            cols = [c for c in SIDE_COLUMNS if c in names]
            for batch in pf.iter_batches(batch_size=4096, columns=cols):
                yield from (rec for rec in batch.to_pylist() if rec.get("status") not in (None, "success"))
    except Exception as e:  # noqa: BLE001 - the failed downloads cannot be accounted for: the shard fails
        raise SourceError(f"cannot read img2dataset's side parquet {redact_url(path, ctx.secrets)} of this tar: "
                          f"{describe_error(e, ctx.secrets)}") from None


def _failed_download_row(rec: dict, ctx: ShardContext) -> dict:
    """An error row for a URL img2dataset could not download (as the parquet format gives it)."""
    key = rec.get("key")
    url = rec.get("url")
    _, _, resp_f = ctx.field_names()
    return {"id": as_text(key, "key") if key is not None else None,
            "image_uri": url if isinstance(url, str) and url.strip() else None,
            "response": as_text(rec.get("caption"), "caption") if resp_f else None,
            "status": "error", "error_kind": "source_status",
            "error": img2dataset_status_error(rec.get("status"), rec.get("error_message"))}


def _tar_row(key: str, members: dict, ctx: ShardContext) -> dict:
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
