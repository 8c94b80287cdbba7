"""pipeline.decode: image/mask decoding decisions, the DecodeStage row contract, fetch retries, redaction,
and the hostile bad-input shard read end to end (local and s3://)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from badinput import (  # noqa: F401
    FLAKY_SECRET,
    SIZE,
    FlakyFS,
    encode,
    flaky,
    outcome_key,
    rgb_image,
    special_images,
    write_bad_input_shard,
)
from PIL import Image

from dcam.pipeline.decode import (
    DECODED_COLUMNS,
    DecodeError,
    DecodeStage,
    check_objects,
    decode_image,
    decode_mask,
    decoded_schema,
    resize_nearest,
)
from dcam.pipeline.sources import count_rows, list_shards, read_shard


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> the numpy batch format Ray hands to map_batches."""
    batch = {}
    for c in rows[0]:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[c] for r in rows]
        batch[c] = arr
    batch["row_index"] = np.asarray([r["row_index"] for r in rows], dtype=np.int64)
    return batch


def raw(**kw) -> dict:
    row = {"id": "r", "shard": "s", "row_index": 0, "image": None, "image_uri": None, "prompt": "p",
           "response": None, "mask": None, "objects": None, "status": "ok", "error": None, "error_kind": None}
    row.update(kw)
    return row


def run_stage(rows: list[dict], cfg: dict | None = None) -> list[dict]:
    out = DecodeStage(cfg)(as_batch(rows))
    assert set(out) == set(DECODED_COLUMNS)
    assert out["height"].dtype == np.int32 and out["row_index"].dtype == np.int64
    return [{c: out[c][i] for c in out} for i in range(len(rows))]


# ----------------------------------------------------------------------------------------------- decode_image

def test_decode_image_cases():
    cases = special_images()
    for key, (data, (status, what)) in cases.items():
        if status == "error":
            with pytest.raises(DecodeError) as ei:
                decode_image(data)
            assert ei.value.kind == what, (key, ei.value)
        else:
            arr, notes = decode_image(data)
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous
            assert what in ";".join(notes), (key, notes)
    assert decode_image(cases["tiny_1x1"][0])[0].tolist() == [[[9, 8, 7]]]
    sixteen = decode_image(cases["png_16bit"][0])[0]
    v = np.arange(192).reshape(12, 16) * 300
    assert (sixteen[:, :, 0] == np.round(v * 255 / 65535)).all() and (sixteen[..., 0] == sixteen[..., 2]).all()
    assert decode_image(cases["exif_rotated_jpeg"][0])[0].shape == (16, 8, 3)  # 16x8 JPEG rotated 90 degrees
    red = decode_image(cases["cmyk_jpeg"][0])[0].reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 40 and red[2] < 40
    rgba = decode_image(cases["rgba_png"][0])[0].astype(int)
    base = np.asarray(rgb_image()).astype(int)
    assert np.abs(rgba - (base * 128 + 255 * 127) / 255).max() <= 1.0  # alpha 128 over white


def test_decode_image_bomb_limit_is_checked_before_decoding():
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert decode_image(data, max_pixels=100)[0].shape == (10, 10, 3)
    with pytest.raises(DecodeError, match="10x10 = 100 pixels > max_pixels 99") as ei:
        decode_image(data, max_pixels=99)
    assert ei.value.kind == "bomb"
    png = encode(rgb_image((64, 64)), "PNG")
    with pytest.raises(DecodeError, match="truncated or corrupt") as ei:
        decode_image(png[: len(png) * 2 // 3])
    assert ei.value.kind == "decode"



# ----------------------------------------------------------------------------------------------- EXIF orientation

def l_shaped_object(h: int = 32, w: int = 48) -> np.ndarray:
    """(h, w) id mask of an L made of 8 x 8 blocks (JPEG-block aligned): no two of the 8 orientations
    of it are equal, so a mask turned the wrong way cannot align with the image by chance."""
    m = np.zeros((h, w), np.uint8)
    m[8:24, 8:16] = 1  # the stem
    m[16:24, 16:40] = 1  # the foot
    return m


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_mask_in_the_stored_frame_turns_with_an_exif_oriented_image(orientation, fmt):
    """Issue 13 defect 8: the image is stored as an L (white on black) with an EXIF orientation tag;
    the mask is the same L in the stored pixel frame. After decoding, the mask must cover exactly the
    white pixels of the decoded (EXIF-turned) image, with no mask_resized note. The old code turned
    the image only: orientation 6 gave a nearest-stretched mask, orientation 3 an unturned one."""
    stored = l_shaped_object()
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = encode(Image.fromarray(np.repeat(stored[:, :, None] * 255, 3, axis=2)), fmt, exif=exif.tobytes(),
                   **({"quality": 95} if fmt == "JPEG" else {}))
    row = DecodeStage().decode_one(raw(image=image, mask=encode(Image.fromarray(stored), "PNG"),
                                       objects=json.dumps([{"id": 1, "words": ["l"]}])))
    assert row["status"] == "ok", row["error"]
    assert ("exif_transposed" in row["notes"]) == (orientation != 1) and "mask_resized" not in row["notes"]
    h, w = row["height"], row["width"]
    assert (h, w) == ((48, 32) if orientation >= 5 else (32, 48))
    white = np.frombuffer(row["pixels"], np.uint8).reshape(h, w, 3).mean(axis=2) > 127
    mask = np.frombuffer(row["mask_pixels"], "<u2").reshape(h, w)
    assert (white == (mask == 1)).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_like_exif_equals_pil_exif_transpose(orientation):
    from PIL import ImageOps

    from dcam.pipeline.decode import orient_like_exif

    a = np.random.default_rng(orientation).integers(0, 255, (5, 7), dtype=np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(orient_like_exif(a, orientation), want)

def test_decode_mask_modes_and_resize():
    m16 = np.zeros((4, 6), np.uint16)
    m16[1, 2] = 300
    arr, notes = decode_mask(encode(Image.fromarray(m16), "PNG"), 4, 6)
    assert arr.dtype == np.uint16 and arr[1, 2] == 300 and notes == []
    pal = Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    assert decode_mask(encode(pal, "PNG"), 2, 2)[0].tolist() == [[0, 1], [2, 2]]  # indices, not colours
    small = np.array([[1, 2], [3, 0]], np.uint8)
    up, notes = decode_mask(encode(Image.fromarray(small), "PNG"), 4, 4)
    assert notes == ["mask_resized"] and (up == np.kron(small, np.ones((2, 2), np.uint8))).all()
    with pytest.raises(DecodeError, match="colour") as ei:
        decode_mask(encode(rgb_image(), "PNG"), SIZE[1], SIZE[0])
    assert ei.value.kind == "mask"
    assert (resize_nearest(np.arange(4).reshape(2, 2), 2, 2) == np.arange(4).reshape(2, 2)).all()


def test_check_objects():
    assert check_objects('[{"id": 1, "words": ["a"], "category": "c", "bbox": [0, 0, 1, 1]}, {"id": 2}]') == {1, 2}
    for bad in ("{", '{"id": 1}', '[{"id": 0}]', '[{"id": 1}, {"id": 1}]', '[{"id": "1"}]', '[{"id": true}]',
                '[{"id": 1, "words": "a"}]', '[{"id": 1, "bbox": [1, 2]}]', '[{"id": 70000}]'):
        with pytest.raises(DecodeError) as ei:
            check_objects(bad)
        assert ei.value.kind == "objects", bad


# ----------------------------------------------------------------------------------------------- DecodeStage

def test_stage_contract_and_never_raises(monkeypatch):
    good = encode(rgb_image(), "PNG")
    rows = [raw(id="ok", image=good), raw(id="weird", image=12345), raw(id="src", status="error", error="boom",
            error_kind="duplicate_id"), raw(id="noimg"), raw(id="bytes_prompt", image=good, prompt=b"hi \xff"),
            raw(id="blank_resp", image=good, response="  ", prompt="   ")]
    out = run_stage(rows, {"decode": {"default_prompt": "caption the image"}})
    by = {r["id"]: r for r in out}
    assert len(out) == len(rows) and sum(r["status"] in ("ok", "error") for r in out) == len(rows)
    ok = by["ok"]
    assert ok["status"] == "ok" and (ok["height"], ok["width"]) == (SIZE[1], SIZE[0])
    assert np.frombuffer(ok["pixels"], np.uint8).reshape(SIZE[1], SIZE[0], 3).tolist() == \
        np.asarray(rgb_image()).tolist()
    assert by["weird"]["error_kind"] == "decode" and by["weird"]["pixels"] == b""
    assert (by["src"]["error_kind"], by["src"]["error"]) == ("duplicate_id", "boom")
    assert by["noimg"]["error_kind"] == "missing_image"
    assert by["bytes_prompt"]["error_kind"] == "encoding"
    blank = by["blank_resp"]
    assert blank["prompt"] == "caption the image" and blank["response"] is None
    assert blank["notes"] == "default_prompt;empty_response"
    import pyarrow as pa

    import dcam.pipeline.decode

    def bug(*a, **k):
        raise RuntimeError(f"bug with secret {FLAKY_SECRET}")

    monkeypatch.setattr(dcam.pipeline.decode, "decode_oriented_image", bug)  # what the stage calls
    out = run_stage([raw(image=good)], {"storage": {"secret": FLAKY_SECRET}})
    assert out[0]["error_kind"] == "internal" and FLAKY_SECRET not in out[0]["error"]
    monkeypatch.undo()
    out_cols = DecodeStage()(as_batch(rows))
    table = pa.table({c: pa.array(list(out_cols[c]), decoded_schema().field(c).type) for c in DECODED_COLUMNS})
    assert table.num_rows == len(rows)


def test_stage_mask_output():
    objects = json.dumps([{"id": 1, "words": ["x"], "category": "x", "bbox": [0, 0, 2, 2]},
                          {"id": 300, "words": ["y"], "category": "y", "bbox": None}])
    m = np.zeros((SIZE[1], SIZE[0]), np.uint16)
    m[0, 0], m[5, 5] = 1, 300
    out = run_stage([raw(image=encode(rgb_image(), "PNG"), objects=objects, mask=encode(Image.fromarray(m), "PNG"))])
    assert out[0]["status"] == "ok", out[0]["error"]
    got = np.frombuffer(out[0]["mask_pixels"], "<u2").reshape(SIZE[1], SIZE[0])
    assert (got == m).all()
    out = run_stage([raw(image=encode(rgb_image(), "PNG"), mask=encode(Image.fromarray(m), "PNG"))])
    assert out[0]["error_kind"] == "mask" and "[1, 300]" in out[0]["error"]


def test_fetch_retries_404_and_redaction(flaky):
    cfg = {"storage": flaky}
    FlakyFS.fail = 2
    out = run_stage([raw(image_uri="flaky:///dcam/img.png")], cfg)
    assert out[0]["status"] == "ok" and FlakyFS.calls == 3
    FlakyFS.fail, FlakyFS.calls = 100, 0
    FlakyFS.message = f"connection reset; signed url had secret={FLAKY_SECRET}"
    out = run_stage([raw(image_uri="flaky:///dcam/img.png")], cfg)
    assert out[0]["error_kind"] == "fetch" and "gave up after 3 attempts" in out[0]["error"]
    assert FlakyFS.calls == 3 and FLAKY_SECRET not in out[0]["error"] and "***" in out[0]["error"]
    FlakyFS.fail, FlakyFS.calls = 0, 0
    out = run_stage([raw(image_uri="flaky:///dcam/missing.png")], cfg)
    assert out[0]["error_kind"] == "fetch" and "not found" in out[0]["error"] and FlakyFS.calls == 1
    out = run_stage([raw(image_uri=f"ftp://u:{FLAKY_SECRET}@h/x.png")], cfg)
    assert out[0]["error_kind"] == "fetch" and "not allowed" in out[0]["error"]
    assert FLAKY_SECRET not in out[0]["error"]
    assert FLAKY_SECRET not in repr(DecodeStage(cfg))


def test_fetch_too_large(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(encode(rgb_image((64, 64)), "PNG"))
    out = run_stage([raw(image_uri=str(p))], {"decode": {"max_image_bytes": 100}})
    assert out[0]["error_kind"] == "too_large"


# ----------------------------------------------------------------------------------------------- bad input shard

@pytest.mark.parametrize("where", ["local", "s3"])
def test_bad_input_shard(where, tmp_path, request):
    if where == "local":
        url, opts = str(tmp_path / "bad" / "shard.parquet"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        url, opts = f"{bucket.url}/bad/shard.parquet", bucket.storage_options
    expected = write_bad_input_shard(url, opts)
    [spec] = list_shards(url.rsplit("/", 1)[0], "auto", opts)
    rows = list(read_shard(spec, opts))
    assert count_rows(spec, opts) == len(rows) == len(expected)
    out = run_stage(rows, {"storage": opts})
    assert sum(r["status"] == "ok" for r in out) + sum(r["status"] == "error" for r in out) == len(rows)
    seen: dict[str, int] = {}
    for r in out:
        seen[r["id"]] = seen.get(r["id"], 0) + 1
        status, what = expected[outcome_key(r["id"], seen[r["id"]])]
        assert r["status"] == status, (r["id"], r["error"])
        if status == "error":
            assert r["error_kind"] == what and r["error"] and r["pixels"] == b"", (r["id"], r["error_kind"])
        else:
            assert what in r["notes"] and r["error"] is None and len(r["pixels"]) == r["height"] * r["width"] * 3
    byid = {r["id"]: r for r in out}
    assert byid["exif_rotated_jpeg"]["height"] == 16 and byid["mask_size_mismatch"]["mask_pixels"] is not None
    assert byid["unknown_words_response"]["response"] == "a zebra juggling flaming torches"
    assert byid["mask_missing"]["mask_pixels"] is None


def test_coco_rows_decode(tmp_path):
    """COCO raw rows (image_uri + mask + objects) pass DecodeStage with masks intact."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode(rgb_image((8, 6)), "PNG"))
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 6, "width": 8}],
           "categories": [{"id": 5, "name": "dog"}],
           "annotations": [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 3, 2],
                            "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]}]}
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    [spec] = list_shards(str(tmp_path / "instances.json"))
    source = {"coco_images": str(tmp_path / "images")}
    out = run_stage(list(read_shard(spec, None, source)))
    assert out[0]["status"] == "ok" and out[0]["notes"] == "default_prompt"
    mask = np.frombuffer(out[0]["mask_pixels"], "<u2").reshape(6, 8)
    assert mask.sum() == 6 and (mask[1:3, 1:4] == 1).all()
