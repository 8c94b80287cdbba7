"""pipeline.sources + pipeline.storage: every format from local paths and from s3:// (moto), listing,
counts, order, shard keys, the scheme allowlist, retries and credential redaction."""
from __future__ import annotations

import csv
import io
import json
import tarfile
import time
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from badinput import FLAKY_SECRET, FlakyFS, flaky  # noqa: F401 - fixture
from PIL import Image

from dcam.pipeline import sources, storage
from dcam.pipeline.sources import ShardSpec, SourceError, count_rows, list_shards, make_shard_key, read_shard
from dcam.pipeline.sources.base import safe_name
from dcam.pipeline.sources.coco import clip_margin, clip_polygon, polygon_mask, rle_counts_from_string, rle_decode
from dcam.pipeline.storage import (
    RetriesExhaustedError,
    SchemeNotAllowedError,
    is_transient,
    open_fs,
    redact,
    with_retries,
)

SECRET = FLAKY_SECRET  # planted in the flaky storage options; contains URL-special characters


def png(seed: int = 0, size=(8, 6)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URL, storage_options) of an empty location, once local and once on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "data"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket.url}/data", bucket.storage_options


def put(url: str, data: bytes, opts: dict) -> None:
    fs, path = open_fs(url, opts)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)  # several row groups: iter_batches must cross them
    return buf.getvalue()


def read_all(url: str, fmt: str, opts: dict, source: dict | None = None) -> tuple[list[ShardSpec], list[dict]]:
    """List, read every shard twice (determinism) and check count_rows / row_index against the rows."""
    specs = list_shards(url, fmt, opts)
    assert [s.url for s in specs] == sorted(s.url for s in specs)
    rows = []
    for spec in specs:
        got = list(read_shard(spec, opts, source))
        assert got == list(read_shard(spec, opts, source))
        assert count_rows(spec, opts, source) == len(got)
        assert [r["row_index"] for r in got] == list(range(len(got)))
        assert all(r["shard"] == spec.url and set(r) == set(sources.RAW_COLUMNS) for r in got)
        rows += got
    return specs, rows


# ----------------------------------------------------------------------------------------------- formats

def test_parquet_dcam(root):
    url, opts = root
    objects = json.dumps([{"id": 1, "words": ["red", "circle"], "category": "circle", "bbox": [0, 0, 2, 2]}])
    for name, ids in (("b.parquet", ["b0", "b1", "b2"]), ("a.parquet", ["a0", "a1", "a2"])):
        t = pa.table({"id": ids, "image": [png(i) for i in range(3)], "prompt": ["describe the image", "", None],
                      "response": ["a red circle", None, None], "mask": [None] * 3, "objects": [objects, None, None]})
        put(f"{url}/{name}", parquet_bytes(t), opts)
    put(f"{url}/_SUCCESS", b"", opts)
    put(f"{url}/.hidden.parquet", b"junk", opts)
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["parquet", "parquet"]
    assert [s.url.rsplit("/", 1)[1] for s in specs] == ["a.parquet", "b.parquet"]
    assert [r["id"] for r in rows] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["image"] == png(0) and rows[0]["objects"] == objects and rows[0]["response"] == "a red circle"
    assert rows[1]["prompt"] == "" and rows[2]["prompt"] is None


def webdataset_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset(root):
    url, opts = root
    members = []
    for i in range(3):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", png(i)), (f"{key}.txt", f"caption {i}".encode()),
                    (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
    members += [("000000003.txt", b"no image here"), ("000000000.png", png(9)),  # missing image; dup key
                ("000000004.jpg", png(4)), ("000000004.txt", b"bad \xff utf8")]
    put(f"{url}/00000.tar", webdataset_tar(members), opts)
    put(f"{url}/00000.parquet", parquet_bytes(pa.table({"url": ["http://x"], "key": ["0"]})), opts)  # sidecar
    put(f"{url}/00000_stats.json", b"{}", opts)
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["webdataset"]
    assert [r["id"] for r in rows] == ["000000000", "000000001", "000000002", "000000003", "000000000",
                                       "000000004"]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"] * 3
    assert rows[1]["image"] == png(1) and rows[1]["response"] == "caption 1" and rows[1]["prompt"] is None
    assert [r["error_kind"] for r in rows[3:]] == ["missing_image", "duplicate_id", "encoding"]
    assert rows[4]["image"] is None and "first seen at row_index 0" in rows[4]["error"]



def img2dataset_side_parquet(keys: list[str], statuses: list[str], errors: list) -> bytes:
    """The parquet img2dataset writes beside each tar (its column layout, trimmed of size/exif columns)."""
    n = len(keys)
    return parquet_bytes(pa.table({
        "url": [f"https://example.invalid/{k}.jpg" for k in keys], "caption": [f"caption {k}" for k in keys],
        "key": keys, "status": statuses, "error_message": errors, "width": [8 if s == "success" else None for s in statuses],
        "height": [6 if s == "success" else None for s in statuses], "original_width": [None] * n,
        "original_height": [None] * n, "exif": [None] * n, "sha256": [None] * n}))


def test_webdataset_side_parquet_failed_downloads_become_error_rows(root):
    """Issue 13 defect 10: img2dataset's tar output records failed URLs only in the side parquet; each one
    is an error row (kind source_status, the parquet format's wording), counted by count_rows (the
    manifest's row count), after the tar's samples."""
    url, opts = root
    members = []
    for key in ("000000000", "000000002"):
        members += [(f"{key}.jpg", png(int(key))), (f"{key}.txt", f"caption {key}".encode()),
                    (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
    put(f"{url}/00000.tar", webdataset_tar(members), opts)
    put(f"{url}/00000.parquet", img2dataset_side_parquet(
        ["000000000", "000000001", "000000002", "000000003"],
        ["success", "failed_to_download", "success", "failed_to_resize"],
        [None, "HTTP Error 404: Not Found", None, "image too small"]), opts)
    put(f"{url}/00000_stats.json", b"{}", opts)
    put(f"{url}/00001.tar", webdataset_tar(members[:3]), opts)  # a tar without a side parquet: no extra rows
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["webdataset", "webdataset"]
    first = [r for r in rows if r["shard"] == specs[0].url]
    assert [(r["id"], r["status"], r["error_kind"]) for r in first] == [
        ("000000000", "ok", None), ("000000002", "ok", None),
        ("000000001", "error", "source_status"), ("000000003", "error", "source_status")]
    assert first[2]["error"] == "img2dataset status 'failed_to_download': HTTP Error 404: Not Found"
    assert first[3]["error"] == "img2dataset status 'failed_to_resize': image too small"
    assert first[2]["image"] is None and first[2]["image_uri"] == "https://example.invalid/000000001.jpg"
    assert len([r for r in rows if r["shard"] == specs[1].url]) == 1
    # the same failure reads the same as from img2dataset's parquet output format
    put(f"{url}/p/00000.parquet", img2dataset_side_parquet(["000000001"], ["failed_to_download"],
                                                           ["HTTP Error 404: Not Found"]), opts)
    _, prow = read_all(f"{url}/p", "img2dataset_parquet", opts)
    assert (prow[0]["error"], prow[0]["error_kind"]) == (first[2]["error"], first[2]["error_kind"])
    # an unreadable side parquet fails the shard (its failures could not be accounted for), naming the file
    put(f"{url}/00001.parquet", b"not a parquet file", opts)
    for attempt in (lambda: list(read_shard(specs[1], opts)), lambda: count_rows(specs[1], opts)):
        with pytest.raises(SourceError, match="side parquet .*00001.parquet"):
            attempt()

def test_img2dataset_parquet(root):
    url, opts = root
    t = pa.table({"url": ["https://example.invalid/a.jpg", "https://example.invalid/b.jpg", "https://x.invalid/c"],
                  "key": ["000000000", "000000001", "000000002"], "caption": ["a dog", "a cat", "a cow"],
                  "status": ["success", "success", "failed_to_download"],
                  "error_message": [None, None, "HTTP 404"], "jpg": [png(0), None, None]})
    put(f"{url}/00000.parquet", parquet_bytes(t), opts)
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["img2dataset_parquet"]
    assert rows[0]["image"] == png(0) and rows[0]["image_uri"] is None and rows[0]["response"] == "a dog"
    assert rows[1]["image"] is None and rows[1]["image_uri"] == "https://example.invalid/b.jpg"
    assert rows[2]["status"] == "error" and rows[2]["error_kind"] == "source_status" and "HTTP 404" in rows[2]["error"]
    _, rows2 = read_all(url, "img2dataset_parquet", opts, {"prompt_field": "caption", "response_field": None})
    assert rows2[0]["prompt"] == "a dog" and rows2[0]["response"] is None


def test_jsonl(root):
    url, opts = root
    lines = [json.dumps({"id": "j0", "image_uri": "imgs/a.png", "prompt": "describe the image"}), "",
             json.dumps({"id": "j1", "url": "s3://other/b.png", "prompt": "what", "response": "a cat",
                         "objects": [{"id": 1, "words": ["cat"], "category": "cat", "bbox": None}]}),
             "{not json", "[1, 2]"]
    data = ("\n".join(lines) + "\n").encode() + b'{"id": "j5", "image_uri": "/x.png", "prompt": "\xff"}\n'
    put(f"{url}/manifest.jsonl", data, opts)
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["jsonl"] and len(rows) == 5
    assert rows[0]["image_uri"] == f"{url}/imgs/a.png"
    assert rows[1]["image_uri"] == "s3://other/b.png" and json.loads(rows[1]["objects"])[0]["words"] == ["cat"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error", "error"]
    assert [r["error_kind"] for r in rows[2:]] == ["parse", "parse", "encoding"]
    assert rows[2]["id"] == f"{specs[0].shard_key}-2"  # generated, deterministic


def test_csv(root):
    url, opts = root
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerows([["id", "image_uri", "prompt", "response"], ["c0", "imgs/a.png", "describe, please", ""],
                 ["c1", "/abs/b.png", "multi\nline prompt", "a dog"], ["c2", "x.png", "p", "r", "EXTRA"]])
    data = buf.getvalue().encode() + b"c3,y.png,bad \xfe byte,\r\n"
    put(f"{url}/m.csv", data, opts)
    specs, rows = read_all(url, "auto", opts)
    assert [s.format for s in specs] == ["csv"] and len(rows) == 4
    assert rows[0]["prompt"] == "describe, please" and rows[0]["response"] is None
    assert rows[0]["image_uri"] == f"{url}/imgs/a.png"
    assert rows[1]["prompt"] == "multi\nline prompt" and rows[1]["image_uri"] == "/abs/b.png"
    assert [r["error_kind"] for r in rows[2:]] == ["parse", "encoding"]


# ----------------------------------------------------------------------------------------------- coco

def rle_encode(mask: np.ndarray) -> str:
    """pycocotools' rleToString (test-side reference encoder)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    out = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_rle_decode_hand_example_and_roundtrip():
    m = rle_decode({"size": [3, 4], "counts": [1, 2, 3, 6]})  # column-major runs: 0, 11, 000, 111111
    assert m.astype(int).tolist() == [[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]]
    assert rle_counts_from_string("1234") == [1, 2, 3, 6]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        h, w = mask.shape
        assert (rle_decode({"size": [h, w], "counts": rle_encode(mask)}) == mask).all()
    with pytest.raises(ValueError):
        rle_decode({"size": [3, 4], "counts": [1, 2]})


def test_polygon_fill_pixel_exact():
    rect = polygon_mask([1, 1, 4, 1, 4, 3, 1, 3], 6, 8)  # COCO pixel j spans [j, j+1): 3 x 2 pixels
    expect = np.zeros((6, 8), bool)
    expect[1:3, 1:4] = True
    assert (rect == expect).all()
    ell = polygon_mask([0, 0, 3, 0, 3, 1, 1, 1, 1, 3, 0, 3], 4, 4)  # non-convex L
    assert ell.astype(int).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert polygon_mask([0.8, 0.8, 4.2, 0.8, 4.2, 3.2, 0.8, 3.2], 6, 8).sum() == 3 * 2  # 20% fringes out
    assert polygon_mask([0.3, 0.3, 4.7, 0.3, 4.7, 3.7, 0.3, 3.7], 6, 8).sum() == 5 * 4  # 70% fringes in
    tri = [0.2, 0.3, 9.7, 1.1, 3.3, 8.6]  # compare with exact coverage where it is not near 50%
    got = polygon_mask(tri, 10, 10)
    yy, xx = np.mgrid[0:10 * 64, 0:10 * 64] / 64 + 1 / 128
    (x0, y0), (x1, y1), (x2, y2) = np.reshape(tri, (3, 2))
    side = lambda ax, ay, bx, by: (bx - ax) * (yy - ay) - (by - ay) * (xx - ax)  # noqa: E731
    s = np.sign(side(x0, y0, x1, y1))
    inside = (np.sign(side(x1, y1, x2, y2)) == s) & (np.sign(side(x2, y2, x0, y0)) == s)
    cover = inside.reshape(10, 64, 10, 64).mean(axis=(1, 3))
    clear = (cover < 0.35) | (cover > 0.65)
    assert (got[clear] == (cover[clear] > 0.5)).all()



def random_polygon(rng: np.random.Generator, h: int, w: int, outside: float = 0.0) -> list[float]:
    """A random star-shaped polygon (3..12 vertices, non-integer coordinates), vertices up to
    `outside` pixels beyond the image."""
    n = int(rng.integers(3, 13))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    r = rng.uniform(0.5, max(h, w) / 2 + outside, n)
    xs = np.clip(cx + r * np.cos(ang), -outside, w + outside)
    ys = np.clip(cy + r * np.sin(ang), -outside, h + outside)
    return np.stack([xs, ys], 1).ravel().round(2).tolist()


def pycocotools_polygon(poly: list[float], h: int, w: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    return coco_mask.decode(coco_mask.frPyObjects([poly], h, w))[:, :, 0].astype(bool)


def test_polygon_masks_equal_pycocotools_on_random_polygons():
    """Issue 13 defect 9: the old PIL fill also painted the outline (masks ~1% too large); dcam's
    polygon masks are now pycocotools' own, pixel for pixel, also for polygons reaching outside
    the image."""
    rng = np.random.default_rng(13)
    for k in range(200):
        h, w = int(rng.integers(4, 80)), int(rng.integers(4, 80))
        poly = random_polygon(rng, h, w, outside=0.0 if k < 100 else 15.0)
        assert (polygon_mask(poly, h, w) == pycocotools_polygon(poly, h, w)).all(), (k, h, w, poly)


def test_polygon_with_a_far_away_vertex_is_clipped_not_rasterised_at_full_extent():
    poly = [1.0, 1.0, 6.0, 1.0, 1e12, 1e12, 1.0, 5.0]
    got = polygon_mask(poly, 8, 8)  # unclipped, pycocotools would need terabytes
    m = clip_margin(8, 8)
    want = pycocotools_polygon(clip_polygon(np.reshape(poly, (-1, 2)), -m, -m, 8 + m, 8 + m).ravel().tolist(), 8, 8)
    assert got.any() and (got == want).all()
    with pytest.raises(ValueError):
        polygon_mask([1, 1, 4, 1, 4], 8, 8)


def test_clip_polygon_keeps_the_part_inside_the_box():
    square = np.array([[-2.0, -2.0], [2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]])
    got = clip_polygon(square, 0, 0, 10, 10)
    assert sorted(map(tuple, got.round(9).tolist())) == [(0.0, 0.0), (0.0, 2.0), (2.0, 0.0), (2.0, 2.0)]
    assert len(clip_polygon(square, 5, 5, 10, 10)) == 0


def test_rle_round_trip_with_pycocotools():
    """pycocotools encodes random masks; dcam decodes them (compressed and as plain runs) to the same
    mask, and its run validation reads pycocotools' strings to runs that rebuild the mask."""
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(9)
    for _ in range(50):
        h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        mask = rng.random((h, w)) < rng.random()
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert (rle_decode(rle) == mask).all()
        runs = rle_counts_from_string(rle["counts"])
        assert (rle_decode({"size": [h, w], "counts": runs}) == mask).all()
        assert rle["counts"].decode() == rle_encode(mask)
    with pytest.raises(ValueError):  # a short RLE: pycocotools would leave pixels uninitialised
        rle_decode({"size": [3, 4], "counts": "1"})

def test_coco(root):
    url, opts = root
    h, w = 6, 8
    crowd = np.zeros((h, w), bool)
    crowd[3:6, 0:8] = True
    rle_counts = np.zeros((h, w), bool)
    rle_counts[0:2, 5:8] = True
    rle_flat = rle_counts.T.reshape(-1)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, rle_flat.astype(int), -1]) != 0)).tolist()
    doc = {"images": [{"id": 7, "file_name": "seven.png", "height": h, "width": w},
                      {"id": 3, "file_name": "three.png", "height": h, "width": w}],
           "categories": [{"id": 1, "name": "traffic light"}, {"id": 2, "name": "dog"}],
           "annotations": [
               {"id": 100, "image_id": 7, "category_id": 1, "bbox": [1, 1, 3, 2.5], "iscrowd": 0,
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
               {"id": 101, "image_id": 7, "category_id": 2, "bbox": [0, 3, 8, 3], "iscrowd": 1,
                "segmentation": {"size": [h, w], "counts": rle_encode(crowd)}},
               {"id": 102, "image_id": 7, "category_id": 2, "bbox": [5, 0, 3, 2], "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": runs}},
               {"id": 103, "image_id": 3, "category_id": 9, "bbox": [0, 0, 1, 1], "segmentation": []}]}
    captions = {"annotations": [{"image_id": 7, "caption": " a dog near a light "},
                                {"image_id": 7, "caption": "second"}]}
    put(f"{url}/annotations/instances.json", json.dumps(doc).encode(), opts)
    put(f"{url}/annotations/captions.json", json.dumps(captions).encode(), opts)
    source = {"coco_images": f"{url}/images", "coco_captions": f"{url}/annotations/captions.json"}
    specs, rows = read_all(f"{url}/annotations/instances.json", "auto", opts, source)
    assert [s.format for s in specs] == ["coco"] and [r["id"] for r in rows] == ["7", "3"]
    r = rows[0]
    assert r["status"] == "ok" and r["image_uri"] == f"{url}/images/seven.png" and r["response"] == "a dog near a light"
    objs = json.loads(r["objects"])
    assert [(o["id"], o["words"], o["category"], o["bbox"]) for o in objs] == [
        (1, ["traffic", "light"], "traffic light", [1, 1, 4, 4]), (2, ["dog"], "dog", [0, 3, 8, 6]),
        (3, ["dog"], "dog", [5, 0, 8, 2])]
    expect = np.zeros((h, w), np.uint8)
    expect[crowd] = 2  # crowd first, then instances in annotation order
    expect[1:3, 1:4] = 1
    expect[rle_counts] = 3
    assert (np.asarray(Image.open(io.BytesIO(r["mask"]))) == expect).all()
    assert rows[1]["status"] == "error" and rows[1]["error_kind"] == "parse" and "category_id 9" in rows[1]["error"]


def test_coco_directory_in_cocos_layout(root):
    """input=<coco>/: the instances file is the shard (the captions JSON is not a second instances file),
    images come from <coco>/<split>/; captions are used only when asked (source.coco_captions=auto)."""
    url, opts = root
    doc = {"images": [{"id": 5, "file_name": "000005.jpg", "height": 4, "width": 4}],
           "categories": [{"id": 1, "name": "dog"}],
           "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 0,
                            "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]}
    captions = {"images": doc["images"], "annotations": [{"id": 9, "image_id": 5, "caption": "a dog"}]}
    put(f"{url}/coco/annotations/instances_val2017.json", json.dumps(doc).encode(), opts)
    put(f"{url}/coco/annotations/captions_val2017.json", json.dumps(captions).encode(), opts)
    put(f"{url}/coco/annotations/person_keypoints_val2017.json", json.dumps(captions).encode(), opts)
    put(f"{url}/coco/val2017/000005.jpg", b"jpeg bytes", opts)
    for given in (f"{url}/coco", f"{url}/coco/", f"{url}/coco/annotations"):
        specs, rows = read_all(given, "auto", opts, {})
        assert [s.url.rsplit("/", 1)[-1] for s in specs] == ["instances_val2017.json"], given
        assert [(r["id"], r["status"], r["image_uri"], r["response"]) for r in rows] == \
            [("5", "ok", f"{url}/coco/val2017/000005.jpg", None)]
    _, rows = read_all(f"{url}/coco", "coco", opts, {"coco_captions": "auto"})
    assert rows[0]["response"] == "a dog"
    _, rows = read_all(f"{url}/coco", "coco", opts, {"coco_images": f"{url}/elsewhere"})
    assert rows[0]["image_uri"] == f"{url}/elsewhere/000005.jpg"


def test_coco_directory_without_an_instances_file_is_refused(root):
    url, opts = root
    put(f"{url}/caps/annotations/captions_val2017.json", b'{"images": [], "annotations": []}', opts)
    with pytest.raises(SourceError, match=r"no COCO instances file .*found captions_val2017.json.*"
                                          r"annotations/instances_<split>.json"):
        list_shards(f"{url}/caps", "auto", opts)


def test_coco_malformed_entries_become_error_rows(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}, "not a dict",
                      {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png", "height": 4, "width": 4},
                      {"id": 4, "file_name": "d.png", "height": 4, "width": 4}],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": ["x", 0, 1, 1], "segmentation": []},
                           {"id": 2, "image_id": 3, "category_id": 1, "segmentation": {"size": [9, 9], "counts": [81]}},
                           {"id": 3, "image_id": 4, "category_id": 1, "segmentation": "polygon?"}]}
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    spec = sources.shard_spec(str(tmp_path / "instances.json"), "coco")
    rows = list(read_shard(spec))
    assert count_rows(spec) == len(rows) == 5
    assert [r["error_kind"] for r in rows] == ["parse", "parse", "parse", "mask", "mask"]
    assert [r["id"] for r in rows][:3] == ["1", f"{spec.shard_key}-1", "2"]


# ----------------------------------------------------------------------------------------------- listing

def test_listing_glob_prefix_and_errors(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("part-1.jsonl", "part-0.jsonl", "sub/part-2.jsonl", "other.jsonl"):
        (d / name).write_text('{"image_uri": "/a.png"}\n')
    assert [s.url for s in list_shards(str(d))] == sorted(str(p) for p in d.rglob("*.jsonl"))
    assert [s.url.rsplit("/", 1)[1] for s in list_shards(f"{d}/part-*.jsonl")] == ["part-0.jsonl", "part-1.jsonl"]
    assert [s.url.rsplit("/", 1)[1] for s in list_shards(f"{d}/part-")] == ["part-0.jsonl", "part-1.jsonl"]
    assert list_shards(f"file://{d}/other.jsonl")[0].url == str(d / "other.jsonl")
    (d / "x.csv").write_text("image_uri\n/a.png\n")
    with pytest.raises(SourceError, match="ambiguous"):
        list_shards(str(d))
    assert len(list_shards(str(d), "csv")) == 1
    with pytest.raises(SourceError, match="cannot list"):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown input format"):
        list_shards(str(d), "tfrecord")


def test_corrupt_shard_is_a_shard_error(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 not really")
    spec = sources.shard_spec(str(p), "parquet")
    with pytest.raises(SourceError):
        count_rows(spec)
    with pytest.raises(SourceError):
        list(read_shard(spec))


def test_shard_key_sanitisation():
    for url in ("s3://bucket/../../etc/passwd", "/abs/path/../x.parquet", "file:///etc/shadow",
                "https://h/a?b=../c&d=/e", "gs://b/" + "ü" * 50 + "/x.tar", "s3://b/" + "a/" * 200 + "x.parquet",
                "..", "/"):
        key = make_shard_key(url)
        assert "/" not in key and "\\" not in key and ".." not in key and not key.startswith((".", "-"))
        assert len(key) <= 64 + 11 and key == make_shard_key(url)
        assert all(c.isalnum() and c.isascii() or c in "._-" for c in key)
    assert make_shard_key("s3://b/x.parquet") != make_shard_key("gs://b/x.parquet")
    assert make_shard_key("/d/a/x.parquet").startswith("d_a_x.parquet-")
    assert safe_name("../../etc") == "etc" and safe_name("") == "x"


# ----------------------------------------------------------------------------------------------- storage

def test_scheme_allowlist():
    for url in ("ftp://host/x.parquet", "hdfs://nn/x", "sftp://h/x", "ssh://h/x"):
        with pytest.raises(SchemeNotAllowedError, match="not allowed"):
            list_shards(url)
    with pytest.raises(SchemeNotAllowedError):
        open_fs("/tmp/x", {"allowed_schemes": ["s3"]})
    fs, path = open_fs("memory://dcam/x", {"allowed_schemes": ["memory"]})
    assert path.endswith("dcam/x")


def test_source_reads_are_retried(flaky):
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}], "annotations": [], "categories": []}
    FlakyFS().pipe_file("/dcam/instances.json", json.dumps(doc).encode())
    spec = sources.shard_spec("flaky:///dcam/instances.json", "coco")
    FlakyFS.fail = 2
    assert [r["id"] for r in read_shard(spec, flaky)] == ["1"] and FlakyFS.calls == 3
    FlakyFS.fail, FlakyFS.calls, FlakyFS.message = 100, 0, f"reset while sending {SECRET}"
    with pytest.raises(SourceError, match="gave up after 3 attempts") as ei:
        count_rows(spec, flaky)
    assert FlakyFS.calls == 3 and SECRET not in str(ei.value)


def test_with_retries_transient_then_success():
    calls, sleeps = [], []

    def fn():
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("reset")
        return "ok"

    assert with_retries(fn, attempts=3, base_delay=0.1, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2  # exponential, jittered 50-100%


def test_with_retries_bounded_and_404_not_retried():
    calls = []

    def down():
        calls.append(1)
        raise TimeoutError(f"timed out talking to {SECRET}")

    t0 = time.monotonic()
    with pytest.raises(RetriesExhaustedError, match="gave up after 4 attempts") as ei:
        with_retries(down, attempts=4, base_delay=0.001, secrets=[SECRET])
    assert len(calls) == 4 and time.monotonic() - t0 < 1 and SECRET not in str(ei.value)

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, attempts=5, base_delay=0.001)
    assert len(calls) == 1


class FakeClientError(Exception):
    def __init__(self, status, code):
        super().__init__(f"{code} ({status})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def wrapped(cause: BaseException) -> OSError:
    e = OSError(5, "s3 said no")
    e.__cause__ = cause
    return e


def during_value_error(exc: BaseException) -> BaseException:
    try:
        raise ValueError("unrelated")
    except ValueError:
        try:
            raise exc
        except BaseException as e:  # noqa: BLE001
            return e


@pytest.mark.parametrize("exc, transient", [
    (during_value_error(ConnectionError("x")), True), (during_value_error(FileNotFoundError()), False),
    (ConnectionError("x"), True), (ConnectionResetError(), True), (TimeoutError(), True),
    (wrapped(FakeClientError(503, "SlowDown")), True), (wrapped(FakeClientError(500, "InternalError")), True),
    (wrapped(FakeClientError(400, "Throttling")), True), (wrapped(FakeClientError(400, "InvalidArgument")), False),
    (FakeClientError(429, "TooManyRequests"), True), (wrapped(ConnectionResetError()), True),
    (wrapped(FakeClientError(403, "AccessDenied")), False), (wrapped(FakeClientError(404, "NoSuchKey")), False),
    (FileNotFoundError("x"), False), (PermissionError("x"), False), (ValueError("x"), False),
    (SchemeNotAllowedError("x"), False), (OSError(5, "Service Unavailable"), True), (OSError(5, "bad"), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_redact():
    assert redact(f"key={SECRET} and {SECRET}", [SECRET]) == "key=*** and ***"
    assert SECRET not in redact(f"url?sig={quote(SECRET, safe='')}", [SECRET])
    assert quote(SECRET, safe="") not in redact(f"url?sig={quote(SECRET, safe='')}", [SECRET])
    assert redact("https://user:pw@host/x", []) == "https://***@host/x"
    opts = {"key": "AKIA-visible-id", "secret": SECRET, "client_kwargs": {"aws_session_token": "tok-12345"},
            "endpoint_url": "http://127.0.0.1:1"}
    assert set(storage.secrets_of(opts)) >= {SECRET, "AKIA-visible-id", "tok-12345"}
    safe = storage.safe_options(opts)
    assert SECRET not in repr(safe) and "tok-12345" not in repr(safe) and safe["endpoint_url"] == opts["endpoint_url"]


def test_s3_options_from_config_and_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    kw = storage.fsspec_kwargs("s3", {"key": "k1", "secret": "s1", "retry_attempts": 2})
    assert kw == {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "eu-west-3"},
                  "key": "k1", "secret": "s1"}
    kw = storage.fsspec_kwargs("s3", {"endpoint_url": "http://127.0.0.1:10", "region": "r", "anonymous": True})
    assert kw["endpoint_url"] == "http://127.0.0.1:10" and kw["anon"] and kw["client_kwargs"]["region_name"] == "r"
    assert storage.fsspec_kwargs("file", {"secret": "x"}) == {}


def test_secret_never_in_errors(s3_bucket, tmp_path):
    opts = dict(s3_bucket.storage_options, client_kwargs={"aws_session_token": SECRET})
    messages = []
    for call in (lambda: list_shards(f"{s3_bucket.url}/nothing-here/", "parquet", opts),
                 lambda: list_shards(f"ftp://user:{quote(SECRET, safe='')}@host/x"),
                 lambda: list(read_shard(sources.shard_spec(f"{s3_bucket.url}/missing.parquet", "parquet"), opts))):
        with pytest.raises(Exception) as ei:
            call()
        messages.append(str(ei.value))
    assert all(SECRET not in m and quote(SECRET, safe="") not in m for m in messages), messages
