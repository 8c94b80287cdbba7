"""anyres arithmetic against the authors' preprocessing and merge code (vendored tables): tiles,
grid, number of image tokens and newline positions for 16-18 image sizes per model (square,
non-square, tiny, huge, extreme aspect ratios), and the preprocessed pixels (sums over every view)
of the sizes up to ~1 Mpx (building the larger test images alone takes many seconds)."""
import numpy as np
import pytest
import torch
from llada_testing import fixture, reference_image

from dcam.actors.models import anyres

LAVIDA, LLADA_V = fixture("lavida_anyres.json"), fixture("llada_v_anyres.json")


def _layout(table, kind):
    mm = table["mm_config"]
    pins = anyres.expand_pinpoints(mm["image_grid_pinpoints"], 384)
    side = 14 if kind == "lavida" else 27
    return pins, side, anyres.max_tiles_of(mm["image_aspect_ratio"])


@pytest.mark.parametrize("kind,table", [("lavida", LAVIDA), ("llada_v", LLADA_V)])
def test_anyres_table_matches_the_reference(kind, table):
    pins, side, max_tiles = _layout(table, kind)
    for r in table["table"]:
        w, h = r["width"], r["height"]
        tw, th = anyres.grid_shape((w, h), pins, 384)
        assert (1 + tw * th, tw, th) == (r["views"], r["tiles_w"], r["tiles_h"]), (w, h)
        rs, cs = anyres.unpad_slices((w, h), th * side, tw * side)
        rows, cols = len(range(th * side)[rs]), len(range(tw * side)[cs])
        if max_tiles is not None and (shrink := anyres.anyres_max_shrink(rows, cols, side, max_tiles)):
            rows, cols = shrink
        assert (rows, cols) == (r["grid_rows"], r["grid_cols"]), (w, h)
        assert side * side + rows * (cols + 1) == r["n_image_tokens"]
        assert [side * side + i * (cols + 1) + cols for i in range(rows)] == r["newline_positions"]
        if w * h <= 1_100_000:
            views, tiles = anyres.anyres_views(anyres.Image.fromarray(reference_image(w, h, 3)), pins, 384)
            assert len(views) == r["views"] and tiles == (tw, th)
            v = views.astype(np.float64)
            np.testing.assert_allclose([v.sum(), (v ** 2).sum()], [r["pixel_sum"], r["pixel_sq"]], rtol=1e-6)


def test_range_pinpoints_and_best_resolution():
    pins = anyres.expand_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pins) == 36 and pins[0] == (384, 384) and pins[-1] == (2304, 2304)
    assert anyres.select_best_resolution((640, 480), pins) == (768, 768)
    assert anyres.select_best_resolution((384, 384), [(384, 768), (768, 384)]) == (384, 768)  # first wins a tie
    assert anyres.max_tiles_of("anyres") is None and anyres.max_tiles_of("anyres_max_9") == 9
    with pytest.raises(ValueError, match="not supported"):
        anyres.max_tiles_of("pad")


def test_unpad_rounds_like_the_reference():
    """unpad_image keeps int(scaled side) rows/cols, centred: (W, H) = (17, 5) on a 28 x 14 grid."""
    rs, cs = anyres.unpad_slices((17, 5), 28, 14)
    assert (rs.start, rs.stop, cs.start, cs.stop) == (12, 16, 0, 14)  # int(5 * 14 / 17) = 4 rows
    rs, cs = anyres.unpad_slices((5, 17), 14, 28)
    assert (rs.start, rs.stop, cs.start, cs.stop) == (0, 14, 12, 16)
    assert anyres.anyres_max_shrink(54, 54, 27, 4) is None  # 1.0x the budget
    assert anyres.anyres_max_shrink(162, 162, 27, 4) == (54, 54)  # 3x: shrunk to the budget


def test_siglip_normalisation_is_the_reference_processor():
    img = anyres.Image.fromarray(np.arange(384 * 384 * 3, dtype=np.uint32).reshape(384, 384, 3).astype(np.uint8))
    x = anyres.siglip_normalise(img, 384)
    ref = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    ref = ((ref - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)
    assert x.dtype == np.float32 and np.array_equal(x, ref)
    assert torch.from_numpy(x).min() >= -1 and torch.from_numpy(x).max() <= 1
