"""Test helper: one real dcam-format parquet shard full of hostile / awkward input.

`write_bad_input_shard(url, storage_options)` writes the shard (local path or s3://...) plus one sibling
image file (for a working image_uri) and returns {key: (status, error_kind_or_note_substring)}.

Also here: FlakyFS (protocol "flaky://", reads fail with ConnectionError a set number of times) and the
`flaky` fixture (registers it, stores /dcam/img.png, returns storage options that allow the scheme and
plant a fake secret).

Keys are row ids, except that the n-th occurrence (n >= 2) of a repeated id is keyed "<id>#<n>"
(use `outcome_key`). Column types: text columns are large_string, except `prompt`, which is
large_binary so that one row can hold non-UTF-8 bytes (sources decode binary text columns as strict
UTF-8 and turn failures into error rows of kind "encoding").
"""
from __future__ import annotations

import io
import json
import struct
import zlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from dcam.pipeline.storage import join_url, open_fs

SIZE = (16, 12)  # PIL (width, height) of the ordinary test images
OBJECTS = json.dumps([{"id": 1, "words": ["red", "square"], "category": "square", "bbox": [2, 2, 8, 8]}])
SCHEMA = pa.schema([("id", pa.large_string()), ("image", pa.large_binary()), ("image_uri", pa.large_string()),
                    ("prompt", pa.large_binary()), ("response", pa.large_string()), ("mask", pa.large_binary()),
                    ("objects", pa.large_string()), ("explain", pa.large_string())])


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_image(size=SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit gray): a decompression bomb by header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def mask_png(shape_hw, ids=(1,)) -> bytes:
    m = np.zeros(shape_hw, np.uint8)
    for k, oid in enumerate(ids):
        m[1 + 2 * k: 3 + 2 * k, 1:4] = oid
    return encode(Image.fromarray(m), "PNG")


def special_images() -> dict[str, tuple[bytes, tuple[str, str]]]:
    """id -> (encoded bytes, expected outcome) for the image-decoding cases."""
    jpeg = encode(rgb_image((64, 64), 1), "JPEG", quality=95)
    rgba = np.dstack([np.asarray(rgb_image()), np.full((SIZE[1], SIZE[0]), 128, np.uint8)])
    frames = [rgb_image(seed=s) for s in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return {
        "corrupt_bytes": (b"this is not an image\x00\x01\x02" * 4, ("error", "decode")),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], ("error", "decode")),
        "zero_byte": (b"", ("error", "decode")),
        "bomb_20000x20000": (png_header_only(20000, 20000), ("error", "bomb")),
        "bomb_over_max_pixels": (png_header_only(7000, 7000), ("error", "bomb")),
        "tiny_1x1": (encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), ("ok", "")),
        "png_16bit": (encode(Image.fromarray((np.arange(192, dtype=np.uint16).reshape(12, 16) * 300)), "PNG"),
                      ("ok", "16bit_scaled")),
        "cmyk_jpeg": (encode(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG"), ("ok", "cmyk_converted")),
        "rgba_png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), ("ok", "alpha_composited_white")),
        "grayscale_png": (encode(rgb_image().convert("L"), "PNG"), ("ok", "grayscale")),
        "palette_png": (encode(rgb_image().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), ("ok", "palette")),
        "animated_gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
                         ("ok", "first_frame_of_3")),
        "exif_rotated_jpeg": (encode(rgb_image((16, 8), 2), "JPEG", exif=exif), ("ok", "exif_transposed")),
    }


def _rows(base_dir: str) -> list[tuple[dict, tuple[str, str]]]:
    good = encode(rgb_image(), "PNG")
    ok_mask = mask_png((SIZE[1], SIZE[0]))
    rows = [({"id": "good_png", "image": good, "prompt": b"describe the image", "response": "a red square",
              "mask": ok_mask, "objects": OBJECTS}, ("ok", ""))]
    rows += [({"id": k, "image": data, "prompt": b"describe the image"}, exp)
             for k, (data, exp) in special_images().items()]
    rows += [
        ({"id": "uri_ok", "image_uri": join_url(base_dir, "bad-input-ok-image.png")}, ("ok", "default_prompt")),
        ({"id": "uri_404", "image_uri": join_url(base_dir, "bad-input-missing-404.png")}, ("error", "fetch")),
        ({"id": "empty_prompt", "image": good, "prompt": b""}, ("ok", "default_prompt")),
        ({"id": "long_prompt", "image": good, "prompt": b"describe " * 600}, ("error", "prompt")),
        ({"id": "non_utf8_prompt", "image": good, "prompt": b"describe the \xff\xfe image"}, ("error", "encoding")),
        ({"id": "unknown_words_response", "image": good, "prompt": b"describe the image",
          "response": "a zebra juggling flaming torches"}, ("ok", "")),
        ({"id": "mask_missing", "image": good, "prompt": b"describe the image", "objects": OBJECTS}, ("ok", "")),
        ({"id": "mask_size_mismatch", "image": good, "prompt": b"describe the image", "objects": OBJECTS,
          "mask": mask_png((6, 8))}, ("ok", "mask_resized")),
        ({"id": "mask_ids_not_in_objects", "image": good, "prompt": b"describe the image", "objects": OBJECTS,
          "mask": mask_png((SIZE[1], SIZE[0]), ids=(1, 7))}, ("error", "mask")),
        ({"id": "bad_objects_json", "image": good, "prompt": b"describe the image", "objects": "[{\"id\": 1,"},
         ("error", "objects")),
        ({"id": "explain_word_absent", "image": good, "prompt": b"describe the image", "response": "a red square",
          "explain": "blue"}, ("ok", "")),
        ({"id": "good_png", "image": good, "prompt": b"describe the image"}, ("error", "duplicate_id")),
    ]
    return rows


def outcome_key(row_id: str, occurrence: int) -> str:
    """Key of the expected outcome for the `occurrence`-th (1-based) row with this id."""
    return row_id if occurrence == 1 else f"{row_id}#{occurrence}"


def write_bad_input_shard(path_or_url: str, storage_options: dict | None = None) -> dict[str, tuple[str, str]]:
    """Write the shard at `path_or_url` (+ a sibling image for the working image_uri); return expectations."""
    base_dir = path_or_url.rsplit("/", 1)[0]
    rows = _rows(base_dir)
    table = pa.Table.from_pylist([{c: r.get(c) for c in SCHEMA.names} for r, _ in rows], schema=SCHEMA)
    fs, path = open_fs(path_or_url, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    ok_fs, ok_path = open_fs(join_url(base_dir, "bad-input-ok-image.png"), storage_options)
    ok_fs.pipe_file(ok_path, encode(rgb_image(seed=5), "PNG"))
    expected, seen = {}, {}
    for r, exp in rows:
        seen[r["id"]] = seen.get(r["id"], 0) + 1
        expected[outcome_key(r["id"], seen[r["id"]])] = exp
    return expected


class FlakyFS(MemoryFileSystem):
    """Memory filesystem whose cat_file fails with ConnectionError `fail` times, then works."""
    protocol = "flaky"
    fail = 0
    calls = 0
    message = "connection reset by peer"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kw):
        FlakyFS.calls += 1
        if FlakyFS.fail:
            FlakyFS.fail -= 1
            raise ConnectionError(FlakyFS.message)
        return super().cat_file(path, start=start, end=end, **kw)


FLAKY_SECRET = "PLANTED-s3cr3t-Value/with+chars"


@pytest.fixture
def flaky():
    """Register flaky://, reset its counters, store /dcam/img.png; return storage options for it."""
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.calls, FlakyFS.fail, FlakyFS.message = 0, 0, "connection reset by peer"
    FlakyFS().pipe_file("/dcam/img.png", encode(rgb_image(seed=3), "PNG"))
    return {"allowed_schemes": ["flaky"], "retry_attempts": 3, "retry_base_delay": 0.001, "secret": FLAKY_SECRET}
