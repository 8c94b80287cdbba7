"""LLaVA-NeXT "anyres" image arithmetic as LaViDa and LLaDA-V run it (their llava/mm_utils.py and
llava_arch.py), re-implemented and checked against the authors' numbers (tests/actors/models/
fixtures/*_anyres.json): which tile grid an image gets, how it is resized, padded and cut, and
which rows/columns of the stitched feature grid survive `unpad_image`.

Conventions: sizes are (width, height) as PIL's `image.size`; feature grids are (rows, cols).

1. `select_best_resolution`: among the pinpoints (W, H), the one that keeps the most effective pixels
   after an aspect-preserving downscale (ties: the least wasted area).
2. `resize_and_pad`: resize to fill that resolution on one side (the other side ceil-rounded), paste
   centred on black; cut into tile x tile crops, row-major. A separate tile x tile squashed resize of
   the whole image is the *base view*, always first.
3. Each view goes through the SigLIP processor: x / 255, then (x - 0.5) / 0.5 (float32).
4. `unpad_slices`: the stitched grid (tiles_h * n, tiles_w * n) is cropped back to the image's
   aspect ratio with int() rounding of the scaled side (the letterbox removed).
5. `anyres_max_shrink` (LLaDA-V's anyres_max_N): if the unpadded grid holds more than 1.1^2 x N tiles'
   worth of cells, it is bilinearly shrunk to (int(h // t), int(w // t)).
"""
from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image


def expand_pinpoints(pinpoints, tile: int) -> list[tuple[int, int]]:
    """Pinpoints as a list of (W, H): either a list/tuple of pairs, or LLaVA's range form
    "(1x1),...,(6x6)" (every (i, j) from the first to the last pair, times the tile size)."""
    if isinstance(pinpoints, str) and "x" in pinpoints:
        pairs = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", pinpoints)]
        (a0, b0), (a1, b1) = pairs[0], pairs[-1]
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    if isinstance(pinpoints, str):
        import ast

        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


def select_best_resolution(size: tuple[int, int], resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (W, H) with the largest effective resolution, then the least waste (first wins ties)."""
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in resolutions:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def grid_shape(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(tiles_w, tiles_h) of the anyres grid for an image of size (W, H)."""
    w, h = select_best_resolution(size, expand_pinpoints(pinpoints, tile))
    return w // tile, h // tile


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Aspect-preserving resize that fills one side of `target` (W, H) (ceil on the other, capped), centred on black."""
    ow, oh = image.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    resized = image.resize((nw, nh))  # PIL's default filter (bicubic for RGB), as the reference
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def siglip_normalise(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) float32 as LLaVA's SigLipImageProcessor: (bicubic) resize, x * (1/255) in float64
    cast to float32, then (x - 0.5) / 0.5 in float32."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def anyres_views(image: Image.Image, pinpoints, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """((1 + tiles_w * tiles_h, 3, tile, tile) float32 views: base first, then tiles row-major; (tiles_w, tiles_h))."""
    image = image.convert("RGB")
    best = select_best_resolution(image.size, expand_pinpoints(pinpoints, tile))
    padded = resize_and_pad(image, best)
    crops = [padded.crop((x, y, x + tile, y + tile)) for y in range(0, best[1], tile) for x in range(0, best[0], tile)]
    base = image.resize((tile, tile))  # the squashed whole image (PIL default filter), as the reference
    views = np.stack([siglip_normalise(v, tile) for v in [base] + crops])
    return views, (best[0] // tile, best[1] // tile)


def unpad_slices(size: tuple[int, int], rows: int, cols: int) -> tuple[slice, slice]:
    """(row slice, col slice) of a (rows, cols) stitched feature grid that `unpad_image` keeps for an
    image of size (W, H): the padded direction is cropped symmetrically, int() of the scaled side."""
    ow, oh = size
    if ow / oh > cols / rows:  # padding was added to the height
        new_h = int(oh * (cols / ow))
        pad = (rows - new_h) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_w = int(ow * (rows / oh))
    pad = (cols - new_w) // 2
    return slice(0, rows), slice(pad, cols - pad)


def anyres_max_shrink(rows: int, cols: int, unit: int, max_tiles: int) -> tuple[int, int] | None:
    """LLaDA-V's anyres_max_N: target (rows, cols) when the unpadded grid exceeds 1.1x the N-tile budget
    (linear factor t = sqrt(rows * cols / (N * unit^2))), else None (kept as is)."""
    times = math.sqrt(rows * cols / (max_tiles * unit ** 2))
    if times > 1.1:
        return int(rows // times), int(cols // times)
    return None


def max_tiles_of(aspect_mode: str) -> int | None:
    """N of "anyres_max_N", None for plain "anyres"; any other mode is refused."""
    m = re.fullmatch(r"anyres_max_(\d+)", aspect_mode or "")
    if m:
        return int(m.group(1))
    if aspect_mode == "anyres":
        return None
    raise ValueError(f"image_aspect_ratio {aspect_mode!r} is not supported (anyres or anyres_max_N)")
