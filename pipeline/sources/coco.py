"""COCO instances JSON: one shard per file; images under `source.coco_images`; id masks
rasterised from polygons and RLE by pycocotools (COCO's own tools); `source.coco_captions` gives responses."""
from __future__ import annotations

import io
import json
import posixpath
import re
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from dcam.pipeline.sources.base import MAX_OBJECT_ID, RowError, ShardContext, SourceError, guarded
from dcam.pipeline.storage import join_url, open_fs, retry_settings, with_retries


def load_json(ctx: ShardContext, path: str, fs=None) -> Any:
    """A whole JSON document (COCO files are loaded at once: split huge annotation files for parallelism)."""
    fs = fs or ctx.fs
    attempts, base = retry_settings(ctx.storage_options)
    data = with_retries(lambda: fs.cat_file(path), attempts, base, secrets=ctx.secrets)
    return json.loads(data)


def coco_images(doc: Any) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise SourceError("not a COCO instances file: no 'images' list")
    return doc["images"]


def coco_split(ctx: ShardContext) -> tuple[str, str] | None:
    """(COCO root dir path, split) when the shard sits in COCO's layout: <root>/annotations/instances_<split>.json."""
    m = re.fullmatch(r"instances_(.+)\.json", posixpath.basename(ctx.path), flags=re.I)
    folder = posixpath.dirname(ctx.path)
    if not m or posixpath.basename(folder) != "annotations":
        return None
    return posixpath.dirname(folder), m.group(1)


def coco_images_prefix(ctx: ShardContext) -> str:
    """Where the shard's images are: source.coco_images, else <root>/<split>/ of COCO's layout when that
    folder exists, else the JSON's own folder."""
    if ctx.source.get("coco_images"):
        return ctx.source["coco_images"]
    layout = coco_split(ctx)
    if layout and ctx.fs.isdir(f"{layout[0]}/{layout[1]}"):
        return ctx.shard_dir().rsplit("/", 1)[0] + "/" + layout[1]
    return ctx.shard_dir()


def coco_captions_url(ctx: ShardContext) -> str | None:
    """source.coco_captions; `auto` = annotations/captions_<split>.json beside the instances file (if any)."""
    url = ctx.source.get("coco_captions")
    if url != "auto":
        return url or None
    layout = coco_split(ctx)
    if layout is None:
        return None
    path = f"{layout[0]}/annotations/captions_{layout[1]}.json"
    return f"{ctx.shard_dir()}/captions_{layout[1]}.json" if ctx.fs.exists(path) else None


def _coco_captions(ctx: ShardContext) -> dict:
    url = coco_captions_url(ctx)
    if not url:
        return {}
    fs, path = open_fs(url, ctx.storage_options)
    first: dict = {}
    for ann in load_json(ctx, path, fs).get("annotations", []):
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and isinstance(ann.get("image_id"),
                                                                                         (int, str)):
            first.setdefault(ann.get("image_id"), ann["caption"].strip())
    return first


def read_coco(ctx: ShardContext) -> Iterator[dict]:
    doc = load_json(ctx, ctx.path)
    images = coco_images(doc)
    cats = {c.get("id"): str(c.get("name", "")) for c in doc.get("categories", []) if isinstance(c, dict)}
    anns: dict[Any, list] = defaultdict(list)
    for a in doc.get("annotations", []):
        if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str)):
            anns[a["image_id"]].append(a)
    captions = _coco_captions(ctx)
    prefix = coco_images_prefix(ctx)
    for img in images:
        img_id = img.get("id") if isinstance(img, dict) else None
        key = img_id if isinstance(img_id, (int, str)) else None
        yield guarded(ctx, None if key is None else str(key), _coco_row, img, anns.get(key, []), cats,
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
    """Boolean (h, w) mask of a COCO segmentation: polygon list, RLE (compressed or counts), or list of
    RLEs; the parts of a list are united (pycocotools' merge)."""
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


def clip_margin(h: int, w: int) -> float:
    """How far outside the image a polygon may reach before it is clipped (see polygon_mask)."""
    return float(max(h, w) + 64)


def polygon_mask(poly: list, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of one polygon [x1, y1, x2, y2, ...] in COCO pixel coordinates, rasterised by
    pycocotools (frPyObjects + decode: the masks COCO's own tools and evaluation use), pixel for pixel.
    Only a polygon reaching more than clip_margin px beyond the image (a corrupt vertex: pycocotools'
    time and memory grow with the polygon's extent) is first clipped to the image grown by that margin
    (Sutherland-Hodgman); pycocotools then rounds the new vertices, so pixels along the clipped edges may
    differ from an unbounded rasterisation. Fewer than 3 points or a non-finite coordinate give an empty
    mask; an odd number of coordinates raises ValueError."""
    flat = np.asarray(poly, dtype=np.float64).ravel()
    if len(flat) % 2:
        raise ValueError(f"polygon with an odd number of coordinates ({len(flat)})")
    pts = flat.reshape(-1, 2)
    if len(pts) < 3 or not np.isfinite(pts).all():
        return np.zeros((h, w), bool)
    m = clip_margin(h, w)
    if pts.min() < -m or pts[:, 0].max() > w + m or pts[:, 1].max() > h + m:
        pts = clip_polygon(pts, -m, -m, w + m, h + m)
        if len(pts) < 3:
            return np.zeros((h, w), bool)
    rles = coco_mask.frPyObjects([pts.ravel().tolist()], h, w)
    return coco_mask.decode(rles)[:, :, 0].astype(bool)


def clip_polygon(pts: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The (n, 2) polygon clipped to the box [x0, x1] x [y0, y1] (Sutherland-Hodgman, one box side at a time)."""
    for axis, bound, keep_below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] <= bound if keep_below else pts[:, axis] >= bound
        out = []
        for k in range(len(pts)):
            a, b, a_in, b_in = pts[k - 1], pts[k], inside[k - 1], inside[k]
            if a_in != b_in:  # the edge crosses the side: add the crossing point
                t = (bound - a[axis]) / (b[axis] - a[axis])
                out.append(a + t * (b - a))
            if b_in:
                out.append(b)
        pts = np.array(out, dtype=np.float64).reshape(-1, 2)
    return pts


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Run lengths of COCO's compressed RLE string (pycocotools' rleFrString, LEB128-like, delta-coded).
    Used only to validate an RLE before pycocotools decodes it (see rle_decode)."""
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
    """Boolean (h, w) mask of a COCO RLE {size: [h, w], counts: [...] or compressed string}, decoded by
    pycocotools. The runs are checked first (non-negative, summing to h * w): pycocotools rejects runs
    that overflow the image but leaves a short one's remaining pixels uninitialised."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = rle_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(c < 0 for c in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE counts sum to {sum(runs)}, expected {h * w} (or a run is negative)")
    if h * w == 0:
        return np.zeros((h, w), bool)
    if isinstance(counts, (str, bytes)):
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
    else:
        compressed = coco_mask.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    return coco_mask.decode(compressed).astype(bool)
