"""Raw rows -> decoded rows (docs/ARCHITECTURE.md): validated RGB pixels, id masks and prompts.

`decode_image` is the single place where untrusted image bytes are parsed. Decisions:
  * Decompression bombs: width*height from the header is checked against `max_pixels` (capped at PIL's own
    Image.MAX_IMAGE_PIXELS, which dcam never disables) BEFORE any pixel data is decoded -> kind "bomb".
  * Truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is left False) -> kind "decode".
  * Zero-byte and unrecognised bytes -> kind "decode". A 1x1 image is accepted (no minimum side).
  * Alpha (RGBA, LA, palette with transparency) is composited over white: note "alpha_composited_white".
  * 16-bit grayscale is scaled to 8 bits (round(v * 255 / 65535)): note "16bit_scaled".
  * CMYK -> RGB (PIL's conversion; Adobe-inverted JPEGs are handled by PIL): note "cmyk_converted".
  * Grayscale / bilevel -> RGB: note "grayscale"; palette -> RGB: note "palette".
  * Animated images: the first frame, note "first_frame_of_<N>".
  * EXIF orientation 2-8 is applied (ImageOps.exif_transpose): note "exif_transposed". A mask is given in
    the image's stored pixel frame (the frame of the encoded pixels, before EXIF orientation, as COCO's
    annotations are) and is turned with the image (orient_like_exif); its size is checked against the
    stored size. The mask file's own EXIF tag, if any, is ignored. `objects` bboxes pass unchanged (no
    score reads them).

`DecodeStage` never raises for a bad row: every failure becomes a row with status "error", a precise,
credential-free `error` and an `error_kind`; error rows have pixels=b"", height=width=0, mask_pixels=None.
For every batch, ok rows + error rows == input rows.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dcam.actors.errors import KindedError
from dcam.actors.scenes import DEFAULT_PROMPT
from dcam.pipeline.storage import (
    RetriesExhaustedError,
    SchemeNotAllowedError,
    StorageError,
    describe_error,
    read_bytes,
    redact,
    safe_options,
    secrets_of,
)

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_PROMPT_CHARS = 2000
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_OBJECT_ID = 65535
DECODED_COLUMNS = ("id", "shard", "row_index", "prompt", "response", "objects", "explain", "pixels", "height",
                   "width", "mask_pixels", "status", "error", "error_kind", "notes")


class DecodeError(KindedError):
    """A row that cannot be decoded; `kind` becomes the row's error_kind."""


def decoded_schema():
    """Arrow schema of decoded rows (pixels/mask_pixels as large_binary: big images overflow int32 offsets)."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("shard", pa.string()), ("row_index", pa.int64()),
                      ("prompt", pa.string()), ("response", pa.string()), ("objects", pa.string()),
                      ("explain", pa.string()), ("pixels", pa.large_binary()), ("height", pa.int32()), ("width", pa.int32()),
                      ("mask_pixels", pa.large_binary()), ("status", pa.string()), ("error", pa.string()),
                      ("error_kind", pa.string()), ("notes", pa.string())])


# ----------------------------------------------------------------------------------------------- images

def _pixel_limit(max_pixels: int) -> int:
    pil = Image.MAX_IMAGE_PIXELS
    return min(int(max_pixels), int(pil)) if pil else int(max_pixels)


def _open_checked(data: bytes | None, max_pixels: int, what: str = "image", kind: str = "decode") -> Image.Image:
    """Image.open (header only) + the bomb check; nothing is decoded yet."""
    if data is None or len(data) == 0:
        raise DecodeError(kind, f"zero-byte {what}")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError("bomb", f"{what}: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError(kind, f"{what}: not a recognised image format ({len(data)} bytes, "
                                f"starting {bytes(data[:8]).hex()})") from None
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types
        raise DecodeError(kind, f"{what}: unreadable header ({describe_error(e)})") from None
    w, h = im.size
    limit = _pixel_limit(max_pixels)
    if w * h > limit:
        raise DecodeError("bomb", f"{what} header says {w}x{h} = {w * h} pixels > max_pixels {limit}")
    if w <= 0 or h <= 0:
        raise DecodeError(kind, f"{what} has an empty size {w}x{h}")
    return im


def _load(im: Image.Image, what: str, kind: str = "decode") -> None:
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise DecodeError("bomb", f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data
        raise DecodeError(kind, f"{what}: truncated or corrupt {im.format or ''} data "
                                f"({describe_error(e)})".replace("  ", " ")) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Encoded bytes -> (uint8 array (H, W, 3), notes). Raises DecodeError(kind, message)."""
    arr, notes, _ = decode_oriented_image(data, max_pixels)
    return arr, notes


def decode_oriented_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str], int]:
    """decode_image plus the EXIF orientation (1-8) that was applied to the stored pixels, so that
    a mask given in the stored frame can be turned the same way (orient_like_exif)."""
    notes: list[str] = []
    im = _open_checked(data, max_pixels)
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        im.seek(0)
        notes.append(f"first_frame_of_{n_frames}")
    _load(im, "image")
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF never blocks the pixels
        orientation, _ = 1, notes.append("exif_unreadable")
    if orientation in EXIF_ORIENTATIONS:
        im = ImageOps.exif_transpose(im)
        notes.append("exif_transposed")
    else:
        orientation = 1  # absent, 1, or a value outside 1-8 (PIL ignores those too)
    arr = to_rgb(im, notes)
    return np.ascontiguousarray(arr, dtype=np.uint8), notes, int(orientation)


EXIF_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # the tag values that move pixels


def orient_like_exif(a: np.ndarray, orientation: int) -> np.ndarray:
    """A 2-D array (a mask in the image's stored pixel frame) turned the way ImageOps.exif_transpose
    turns an image whose EXIF orientation tag is `orientation` (1 or unknown: unchanged)."""
    turns = {2: lambda m: m[:, ::-1],  # FLIP_LEFT_RIGHT
             3: lambda m: m[::-1, ::-1],  # ROTATE_180
             4: lambda m: m[::-1, :],  # FLIP_TOP_BOTTOM
             5: lambda m: m.T,  # TRANSPOSE
             6: lambda m: np.rot90(m, -1),  # ROTATE_270 (90 degrees clockwise)
             7: lambda m: m[::-1, ::-1].T,  # TRANSVERSE
             8: lambda m: np.rot90(m, 1)}  # ROTATE_90 (90 degrees counter-clockwise)
    turn = turns.get(int(orientation))
    return a if turn is None else np.ascontiguousarray(turn(a))


def to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3), recording what was done in `notes`."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        notes.append("16bit_scaled")
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        notes.append("float_clipped")
        g = np.clip(np.nan_to_num(np.asarray(im)), 0, 255).round().astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        notes.append("palette")
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im)
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("alpha_composited_white")
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in ("L", "1"):
        notes.append("grayscale")
    elif mode == "CMYK":
        notes.append("cmyk_converted")
    else:
        notes.append(f"mode_{mode}_converted")
    return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------------------------- masks, objects

def resize_nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array (pixel centres), exact for integer scale factors."""
    mh, mw = a.shape
    rows = np.minimum(((np.arange(height) + 0.5) * mh / height).astype(np.int64), mh - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mw / width).astype(np.int64), mw - 1)
    return a[rows][:, cols]


def decode_mask(data: bytes, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tuple[np.ndarray, list[str]]:
    """Mask PNG (pixel = object id) -> (uint16 (height, width), notes). A size mismatch is fixed by a
    nearest resize (note "mask_resized"). Palette masks use the palette indices; RGB masks are accepted
    only when all channels are equal. Raises DecodeError("mask" or "bomb", ...)."""
    im = _open_checked(data, max_pixels, what="mask", kind="mask")
    _load(im, "mask", kind="mask")
    mode, notes = im.mode, []
    if mode in ("L", "P", "1") or mode.startswith("I;16") or mode == "I":
        m = np.asarray(im).astype(np.int64)
    elif mode in ("LA", "RGB", "RGBA"):
        a = np.asarray(im.convert("RGB") if mode == "RGBA" else im)
        a = a[:, :, :1] if mode == "LA" else a
        if a.shape[2] == 3 and not ((a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 0] == a[:, :, 2]).all()):
            raise DecodeError("mask", f"mask is a colour {mode} image; expected one channel of object ids")
        m = a[:, :, 0].astype(np.int64)
    else:
        raise DecodeError("mask", f"unsupported mask mode {mode}")
    if m.min(initial=0) < 0 or m.max(initial=0) > MAX_OBJECT_ID:
        raise DecodeError("mask", f"mask values outside 0..{MAX_OBJECT_ID}")
    if m.shape != (height, width):
        notes.append("mask_resized")
        m = resize_nearest(m, height, width)
    return m.astype(np.uint16), notes


def check_objects(objects: str) -> set[int]:
    """Validate the objects JSON (a list of {id, words, category, bbox}); return the object ids.

    `id` is required (int 1..65535, unique); `words` (list of str), `category` (str or null) and `bbox`
    (4 numbers or null) are type-checked when present. Raises DecodeError("objects", ...)."""
    try:
        parsed = json.loads(objects)
    except (json.JSONDecodeError, TypeError) as e:
        raise DecodeError("objects", f"objects is not valid JSON ({e})") from None
    if not isinstance(parsed, list):
        raise DecodeError("objects", f"objects must be a JSON list, got {type(parsed).__name__}")
    ids: set[int] = set()
    for i, o in enumerate(parsed):
        oid = o.get("id") if isinstance(o, dict) else None
        if not isinstance(oid, int) or isinstance(oid, bool) or not 1 <= oid <= MAX_OBJECT_ID:
            raise DecodeError("objects", f"objects[{i}]: id must be an int in 1..{MAX_OBJECT_ID}, got {oid!r}")
        if oid in ids:
            raise DecodeError("objects", f"objects[{i}]: duplicate object id {oid}")
        words, cat, bbox = o.get("words", []), o.get("category"), o.get("bbox")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DecodeError("objects", f"objects[{i}]: words must be a list of strings")
        if cat is not None and not isinstance(cat, str):
            raise DecodeError("objects", f"objects[{i}]: category must be a string")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4
                                     and all(isinstance(v, (int, float)) for v in bbox)):
            raise DecodeError("objects", f"objects[{i}]: bbox must be 4 numbers")
        ids.add(oid)
    return ids


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError("encoding", f"{name}: not valid UTF-8 (offset {e.start})") from None
    if isinstance(value, float) and value != value:  # NaN from pandas-style nulls
        return None
    return str(value)


# ----------------------------------------------------------------------------------------------- stage

class DecodeStage:
    """Ray map_batches callable (batch_format="numpy"): raw rows -> decoded rows.

    cfg is dcam's config as a dict; used keys: decode.max_pixels, decode.max_prompt_chars,
    decode.max_image_bytes, decode.default_prompt (else source.default_prompt, else the scenes default),
    and the `storage` section for fetching image_uri (retries, endpoint, credentials, allowlist).
    """

    def __init__(self, cfg: dict | None = None):
        cfg = dict(cfg or {})
        dec, src = dict(cfg.get("decode") or {}), dict(cfg.get("source") or {})
        self.max_pixels = int(dec.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.max_prompt_chars = int(dec.get("max_prompt_chars", DEFAULT_MAX_PROMPT_CHARS))
        self.max_image_bytes = int(dec.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))
        self.default_prompt = str(dec.get("default_prompt") or src.get("default_prompt") or DEFAULT_PROMPT)
        self.storage_options = dict(cfg.get("storage") or {})
        self._secrets = secrets_of(self.storage_options)

    def __repr__(self) -> str:
        return (f"DecodeStage(max_pixels={self.max_pixels}, max_prompt_chars={self.max_prompt_chars}, "
                f"storage={safe_options(self.storage_options)})")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = max((len(v) for v in batch.values()), default=0)
        out = [self.decode_one({k: _py(v[i]) for k, v in batch.items()}) for i in range(n)]
        return decoded_batch(out)

    def decode_one(self, raw: dict) -> dict:
        """One raw row -> one decoded row; never raises."""
        notes: list[str] = []
        try:
            return self._decode(raw, notes)
        except DecodeError as e:
            return self._error(raw, e.kind, str(e), notes)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the block; recorded on the row
            return self._error(raw, "internal", describe_error(e, self._secrets), notes)

    def _error(self, raw: dict, kind: str, message: str, notes: list[str]) -> dict:
        prompt, response = raw.get("prompt"), raw.get("response")
        return {"id": _str_or(raw.get("id"), ""), "shard": _str_or(raw.get("shard"), ""),
                "row_index": int(raw.get("row_index") or 0),
                "prompt": prompt if isinstance(prompt, str) else "",
                "response": response if isinstance(response, str) else None,
                "objects": raw.get("objects") if isinstance(raw.get("objects"), str) else None,
                "explain": raw.get("explain") if isinstance(raw.get("explain"), str) else None,
                "pixels": b"", "height": 0, "width": 0, "mask_pixels": None, "status": "error",
                "error": redact(message, self._secrets), "error_kind": kind, "notes": ";".join(notes)}

    def _decode(self, raw: dict, notes: list[str]) -> dict:
        if raw.get("status") == "error":
            raise DecodeError(raw.get("error_kind") or "source", raw.get("error") or "reader marked the row as error")
        prompt = self._prompt(raw.get("prompt"), notes)
        response = _text(raw.get("response"), "response")
        if response is not None and not response.strip():
            response = None
            notes.append("empty_response")
        objects = raw.get("objects")
        objects = json.dumps(objects) if isinstance(objects, list) else _text(objects, "objects")
        object_ids = check_objects(objects) if objects is not None else set()
        pixels, image_notes, orientation = decode_oriented_image(self._image_bytes(raw), self.max_pixels)
        notes.extend(image_notes)
        h, w = pixels.shape[:2]
        mask_pixels = None
        if raw.get("mask") is not None:  # given in the stored pixel frame: turned with the image
            stored_h, stored_w = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
            mask, mask_notes = decode_mask(bytes(raw["mask"]), stored_h, stored_w, self.max_pixels)
            mask = orient_like_exif(mask, orientation)
            notes.extend(mask_notes)
            unknown = sorted(set(np.unique(mask).tolist()) - {0} - object_ids)
            if unknown:
                raise DecodeError("mask", f"mask ids {unknown[:20]} are not in objects "
                                          f"(object ids: {sorted(object_ids)[:20]})")
            mask_pixels = mask.astype("<u2").tobytes()
        return {"id": _str_or(raw.get("id"), ""), "shard": _str_or(raw.get("shard"), ""),
                "row_index": int(raw.get("row_index") or 0), "prompt": prompt, "response": response,
                "objects": objects, "explain": raw.get("explain") if isinstance(raw.get("explain"), str) else None,
                "pixels": pixels.tobytes(), "height": h, "width": w,
                "mask_pixels": mask_pixels, "status": "ok", "error": None, "error_kind": None,
                "notes": ";".join(notes)}

    def _prompt(self, value: Any, notes: list[str]) -> str:
        prompt = _text(value, "prompt")
        if prompt is None or not prompt.strip():
            notes.append("default_prompt")
            return self.default_prompt
        if len(prompt) > self.max_prompt_chars:
            raise DecodeError("prompt", f"prompt has {len(prompt)} characters > decode.max_prompt_chars "
                                        f"{self.max_prompt_chars}")
        return prompt

    def _image_bytes(self, raw: dict) -> bytes:
        data = raw.get("image")
        if isinstance(data, (bytes, bytearray, memoryview)):
            return bytes(data)
        if data is not None:
            raise DecodeError("decode", f"image column holds {type(data).__name__}, expected bytes")
        uri = raw.get("image_uri")
        if not uri:
            raise DecodeError("missing_image", "row has neither image bytes nor an image_uri")
        return self._fetch(str(uri))

    def _fetch(self, uri: str) -> bytes:
        """image_uri -> bytes via fsspec with retries; every failure is DecodeError('fetch' | 'too_large')."""
        where = redact(uri, self._secrets)
        try:
            return read_bytes(uri, self.storage_options, self.max_image_bytes)
        except FileNotFoundError:
            raise DecodeError("fetch", f"image_uri not found: {where}") from None
        except PermissionError:
            raise DecodeError("fetch", f"access denied reading image_uri {where}") from None
        except (RetriesExhaustedError, SchemeNotAllowedError, StorageError) as e:
            raise DecodeError("fetch", f"cannot fetch image_uri {where}: {redact(str(e), self._secrets)}") from None
        except ValueError as e:
            raise DecodeError("too_large", f"image_uri {where}: {redact(str(e), self._secrets)}") from None
        except Exception as e:  # noqa: BLE001
            raise DecodeError("fetch", f"cannot fetch image_uri {where}: {describe_error(e, self._secrets)}") from None


def _py(v: Any) -> Any:
    """numpy scalar -> python value (object arrays already hold python objects)."""
    return v.item() if isinstance(v, np.generic) and not isinstance(v, (np.str_, np.bytes_)) else v


def _str_or(v: Any, default: str) -> str:
    if v is None:
        return default
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def decoded_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Decoded rows -> a numpy batch in DECODED_COLUMNS order (object columns for text/bytes)."""
    out: dict[str, np.ndarray] = {}
    for c in DECODED_COLUMNS:
        vals = [r[c] for r in rows]
        if c == "row_index":
            out[c] = np.asarray(vals, dtype=np.int64)
        elif c in ("height", "width"):
            out[c] = np.asarray(vals, dtype=np.int32)
        else:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[c] = arr
    return out
