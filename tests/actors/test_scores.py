"""Localisation scores (METHOD.md §5) against brute-force definitions and the reported tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dcam.actors import scores as S


def two_object_mask(size=48):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[5:20, 5:20] = 1
    mask[30:45, 25:40] = 3
    return mask


def peaked_map(cell=(1, 1), h=6, w=6, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) * 0.2
    m[cell] = 1.0
    return m


# ----------------------------------------------------------------------------- METHOD.md §5.1

@pytest.mark.parametrize("src,dst", [((6, 6), (48, 48)), ((5, 7), (33, 20)), ((12, 9), (5, 4)),
                                     ((1, 3), (4, 9))])
def test_upsample_matches_torch_bilinear_align_corners_false(src, dst):
    m = np.random.default_rng(1).random((3, *src))
    want = torch.nn.functional.interpolate(torch.from_numpy(m)[:, None], size=dst, mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(S.upsample_map(m, dst), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.upsample_map(m[0], dst), want[0], rtol=0, atol=1e-12)


def otsu_brute_force(u8):
    """Between-class variance for every level, empty classes skipped, first maximum wins."""
    v = u8.ravel().astype(np.float64)
    best_t, best = 0, 0.0
    for t in range(256):
        lo, hi = v[v <= t], v[v > t]
        if lo.size == 0 or hi.size == 0:
            continue
        w0, w1 = lo.size / v.size, hi.size / v.size
        sigma = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if sigma > best * (1 + 1e-12):
            best_t, best = t, sigma
    return best_t


def test_otsu_matches_brute_force_between_class_variance():
    rng = np.random.default_rng(2)
    imgs = []
    for i in range(12):
        a = rng.normal(60 + 5 * i, 15, 300)
        b = rng.normal(170, 25, rng.integers(50, 300))
        imgs.append(np.clip(np.concatenate([a, b]), 0, 255).astype(np.uint8)[:340])
    imgs.append(rng.integers(0, 256, 340).astype(np.uint8))
    got = S.otsu_thresholds(np.stack(imgs))
    for img, t in zip(imgs, got):
        assert t == otsu_brute_force(img)


def test_otsu_degenerate_and_tie_cases():
    assert S.otsu_threshold(np.full((4, 4), 77, np.uint8)) == 0  # single level, as OpenCV
    assert S.otsu_threshold(np.array([0, 0, 255, 255], np.uint8)) == 0  # first maximum
    assert S.otsu_threshold(np.array([10, 10, 200, 200, 200], np.uint8)) == 10
    with pytest.raises(ValueError):
        S.otsu_thresholds(np.zeros((1, 4), np.float32))


def test_to_uint8_truncates():
    np.testing.assert_array_equal(S.to_uint8(np.array([0.0, 0.999, 1.0, 0.5, 1.7, -0.2])),
                                  [0, 254, 255, 127, 255, 0])


# ----------------------------------------------------------------------------- METHOD.md §5.2-5.3

def test_iou_precision_recall_f1_by_hand():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 1  # 4 pixels
    mask[3, 3] = 2
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 pixels, 4 on object 1
    assert S.obj_iou(pred, mask, 1) == pytest.approx(4 / 6)
    assert S.obj_iou(pred, mask, 2) == 0.0
    assert np.isnan(S.obj_iou(pred, mask, 5)) and np.isnan(S.obj_iou(pred, mask, None))
    p, r = S.precision_recall(pred, mask == 1)
    assert (p, r) == (pytest.approx(4 / 6), 1.0)
    assert S.detection_f1(p, r) == pytest.approx(2 * p * r / (p + r))
    assert S.detection_f1(0.0, 0.7) == 0.0
    best, bp, br = S.obj_iou_bestclass(pred, mask)
    assert (best, bp, br) == (pytest.approx(4 / 6), pytest.approx(4 / 6), 1.0)
    assert np.isnan(S.obj_iou_bestclass(pred, np.zeros((4, 4), np.uint8))[0])


def test_score_map_iou_uses_otsu_binarisation_of_upsampled_map():
    mask = two_object_mask()
    m = peaked_map((1, 1))
    up = S.upsample_map(m, mask.shape)
    u8 = np.floor(255 * up).astype(np.uint8)
    pred = u8 > otsu_brute_force(u8)
    row = S.score_map(m, mask, 1)
    inter = (pred & (mask == 1)).sum()
    assert row["obj_iou"] == pytest.approx(inter / (pred | (mask == 1)).sum())
    assert row["precision"] == pytest.approx(inter / pred.sum())
    assert row["recall"] == pytest.approx(inter / (mask == 1).sum())
    assert row["obj_iou_bestclass"] == pytest.approx(max(S.iou(pred, mask == c) for c in (1, 3)))
    assert row["obj_iou"] > 0.3


# ----------------------------------------------------------------------------- METHOD.md §5.5-5.7

def test_contrast_and_concentration_match_definitions():
    mask = two_object_mask()
    m = peaked_map((4, 4), seed=3)
    up = S.upsample_map(m, mask.shape)
    fg = mask > 0
    row = S.score_map(m, mask, 3)
    contrast = up[fg].mean() / (up[~fg].mean() + 1e-8)
    assert row["contrast"] == pytest.approx(contrast, rel=1e-12)
    assert row["contrast_capped"] == pytest.approx(min(contrast / 20, 1))
    assert row["concentration"] == pytest.approx(up[fg].sum() / (up.sum() + 1e-8), rel=1e-12)
    assert row["energy"] == pytest.approx(up[mask == 3].sum() / (up.sum() + 1e-8), rel=1e-12)
    assert S.contrast_ratio(up, mask) == pytest.approx(contrast, rel=1e-12)
    assert S.concentration(up, mask) == pytest.approx(row["concentration"], rel=1e-12)
    assert np.isnan(S.contrast_ratio(up, np.ones_like(mask)))  # no background


def test_f3_per_image_harmonic_and_geometric():
    assert S.f3_harmonic(0.3, 0.12, 0.5) == pytest.approx(3 / (1 / 0.3 + 1 / 0.12 + 1 / 0.5))
    assert S.f3_geometric(0.3, 0.12, 0.5) == pytest.approx((0.3 * 0.12 * 0.5) ** (1 / 3))
    assert S.f3_harmonic(0.0, 0.12, 0.5) == 0.0 and S.f3_geometric(0.3, 0.0, 0.5) == 0.0
    assert np.isnan(S.f3_harmonic(np.nan, 0.1, 0.5))
    mask = two_object_mask()
    row = S.score_map(peaked_map((1, 1)), mask, 1)
    assert row["f3"] == pytest.approx(
        S.f3_harmonic(row["obj_iou"], row["contrast_capped"], row["concentration"]))


# (obj_iou %, contrast ratio, concentration %, reported F3 %) from METHOD.md §5.7
TABLE_ROWS = [
    (20.02, 2.18, 41.22, 18.08), (19.93, 2.04, 41.91, 17.43), (15.21, 2.51, 40.10, 17.61),
    (30.10, 2.58, 51.41, 23.04), (18.16, 1.41, 70.80, 14.22), (17.82, 1.48, 75.42, 14.67),
    (20.39, 1.36, 67.31, 14.23), (28.41, 2.02, 86.14, 20.53),
    (20.12, 2.19, 41.42, 18.16), (25.85, 2.28, 44.01, 20.16), (21.22, 2.20, 47.94, 18.88),
    (21.42, 2.41, 42.63, 19.59), (24.11, 2.29, 44.31, 19.82), (30.10, 2.58, 51.44, 23.04),
]


@pytest.mark.parametrize("iou_pct,contrast,conc_pct,f3_pct", TABLE_ROWS)
def test_parity_f_table_f3_reproduces_reported_values(iou_pct, contrast, conc_pct, f3_pct):
    got = 100 * S.f3_table(iou_pct / 100, contrast, conc_pct / 100)
    assert got == pytest.approx(f3_pct, abs=0.05)


def test_table_f3_is_not_mean_of_per_image_f3():
    ious, cons, concs = np.array([0.1, 0.5]), np.array([1.0, 4.0]), np.array([0.3, 0.7])
    per_image = S.f3_harmonic(ious, S.capped_contrast(cons), concs).mean()
    assert abs(S.f3_table(ious.mean(), cons.mean(), concs.mean()) - per_image) > 1e-3


# ----------------------------------------------------------------------------- pointing etc.

def test_pointing_strict_tolerant_and_wrong_object():
    mask = two_object_mask()  # 6x6 grid on 48 px: 8 px cells
    on_obj1 = S.score_map(peaked_map((1, 1)), mask, 1)
    assert on_obj1["pointing"] == 1.0 and on_obj1["pointing_tol"] == 1.0
    assert on_obj1["wrong_object"] == 0.0
    on_other = S.score_map(peaked_map((1, 1)), mask, 3)
    assert on_other["pointing"] == 0.0 and on_other["wrong_object"] == 1.0
    near = np.zeros((48, 48))
    near[22, 12] = 1.0  # 3 px below object 1 (rows 5..19)
    obj = mask == 1
    assert S.pointing_game(near, obj) == 0.0
    assert S.pointing_game(near, obj, radius_px=3.0) == 1.0
    assert S.pointing_game(near, obj, radius_px=2.9) == 0.0
    assert S.wrong_object(near, mask, 1) == 0.0
    assert S.energy_in_mask(near, obj) == 0.0


def test_pointing_tol_radius_is_half_a_cell():
    mask = np.zeros((40, 40), np.uint8)
    mask[0:10, 0:10] = 1
    m = np.zeros((4, 4))
    m[1, 1] = 1.0  # upsampled peak in cell (1, 1): pixels 10..19, a few px off the object
    row4 = S.score_map(m, mask, 1, grid_cell_px=4.0)  # radius 2 px
    row40 = S.score_map(m, mask, 1, grid_cell_px=40.0)  # radius 20 px
    assert row4["pointing"] == 0.0 and row4["pointing_tol"] == 0.0
    assert row40["pointing_tol"] == 1.0


def test_func_iou_and_f1_iou():
    grid = np.array([[0.0, 0.1], [0.5, 0.9]])  # uint8: 0, 25, 127, 229
    assert S.func_iou(grid, 100) == 0.5
    assert S.func_iou(grid, 127) == 0.5 and S.func_iou(grid, 128) == 0.75
    assert S.f1_iou(0.3, 0.6) == pytest.approx(0.4)
    assert S.f1_iou(0.0, 0.0) == 0.0
    level = S.otsu_level_of_map(peaked_map((2, 2)), (48, 48))
    assert 0 < level < 255


# ----------------------------------------------------------------------------- degenerate

@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_constant_and_all_zero_maps_are_finite(value):
    row = S.score_map(np.full((6, 6), value), two_object_mask(), 1)
    assert set(row) == set(S.SCORE_KEYS)
    assert all(np.isfinite(v) for v in row.values())
    assert row["obj_iou"] == 0.0 and row["obj_iou_bestclass"] == 0.0 and row["f1"] == 0.0
    assert row["pointing"] == 0.0 and row["pointing_tol"] == 0.0 and row["wrong_object"] == 0.0


def test_nan_map_raises_and_missing_mask_or_object_give_nan():
    m = peaked_map()
    bad = m.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.score_map(bad, two_object_mask(), 1)
    assert all(np.isnan(v) for v in S.score_map(m, None, 1).values())
    row = S.score_map(m, two_object_mask(), 2)  # id 2 is not in the mask
    for k in ("obj_iou", "precision", "recall", "f1", "f3", "pointing", "pointing_tol", "energy",
              "wrong_object"):
        assert np.isnan(row[k]), k
    assert np.isfinite(row["obj_iou_bestclass"]) and np.isfinite(row["contrast"])
    empty = S.score_map(m, np.zeros((48, 48), np.uint8), 1)
    assert np.isnan(empty["concentration"]) and np.isnan(empty["obj_iou_bestclass"])


def test_batch_of_8_equals_8_single_calls_and_single_metric_functions():
    mask = two_object_mask()
    rng = np.random.default_rng(9)
    maps = rng.random((8, 6, 6)) ** 3
    maps[0] = 0.0
    objs = [1, 3, 1, None, 3, 2, 1, 3]
    batch = S.score_maps(maps, mask, objs)
    for i, (m, o) in enumerate(zip(maps, objs)):
        single = S.score_map(m, mask, o)
        for k in S.SCORE_KEYS:
            np.testing.assert_array_equal(batch[k][i], single[k], err_msg=k)
        if o in (1, 3) and i > 0:  # cross-check against the one-map metric functions
            up = S.upsample_map(m, mask.shape)
            pred, _ = S.otsu_binarise(up)
            assert single["obj_iou"] == pytest.approx(S.obj_iou(pred, mask, o), abs=1e-12)
            assert single["obj_iou_bestclass"] == pytest.approx(S.obj_iou_bestclass(pred, mask)[0])
            assert single["pointing"] == S.pointing_game(up, mask == o)
            assert single["pointing_tol"] == S.pointing_game(up, mask == o, radius_px=4.0)
            assert single["wrong_object"] == S.wrong_object(up, mask, o)
