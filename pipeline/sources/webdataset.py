"""img2dataset's WebDataset tar shards: <key>.jpg|.png|.webp + <key>.txt + <key>.json (optionally
<key>.mask.png + <key>.objects.json), read with tarfile in streaming mode."""
from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Iterator

from dcam.pipeline.sources.base import IMAGE_EXTS, STREAM_BLOCK, RowError, ShardContext, as_text, guarded, objects_json


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
