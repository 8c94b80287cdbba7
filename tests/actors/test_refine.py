"""Refinement modules (METHOD.md §3) against the plain-loop twins and the METHOD.md §8.5 parity checks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import minimize_scalar

from dcam.actors import refine as R
from dcam.benchmarks import refine_loop as L
from dcam.benchmarks.bench_refine import run_bench_refine


def random_maps(n=5, h=7, w=9, seed=0, zeros=0.2):
    """Non-negative maps in [0, 1] with some exact zeros and a blob (non-trivial percentiles)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, h, w)) ** 2
    maps[rng.random((n, h, w)) < zeros] = 0.0
    maps[:, h // 3:h // 3 + 2, w // 3:w // 3 + 3] += 0.8
    return maps / maps.max(axis=(1, 2), keepdims=True)


# ----------------------------------------------------------------------------- RGF / AKD

@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_rgf_matches_loop_reference(k):
    maps = random_maps(seed=k)
    fast = R.rank_gaussian_filter(maps, k)
    slow = np.stack([L.rgf_loop(m, k) for m in maps])
    np.testing.assert_array_equal(fast, slow)  # same float operations, same order
    direct = np.stack([L.rgf_loop_direct(m, k) for m in maps])  # explicit exp per rank
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-12)


def test_rgf_large_kernel_uses_sort_path_and_matches():
    maps = random_maps(n=2, h=6, w=5, seed=3)
    np.testing.assert_allclose(R.rank_gaussian_filter(maps, 11),
                               np.stack([L.rgf_loop_direct(m, 11) for m in maps]), atol=1e-12)


def test_batcher_network_sorts_all_binary_inputs():
    net = R.batcher_network(9)
    for bits in itertools.product([0, 1], repeat=9):
        v = list(bits)
        for a, b in net:
            if v[a] > v[b]:
                v[a], v[b] = v[b], v[a]
        assert v == sorted(bits)


def test_rgf_per_map_kernel_sizes():
    maps = random_maps(n=4, seed=5)
    out = R.rank_gaussian_filter(maps, [3, 5, 3, 7])
    for m, k, o in zip(maps, [3, 5, 3, 7], out):
        np.testing.assert_array_equal(o, L.rgf_loop(m, k))


def test_parity_e_rgf_constant_positive_window_returns_constant():
    m = np.full((1, 5, 6), 0.37)
    out = R.rank_gaussian_filter(m, 3)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0.37, rtol=0, atol=1e-15)
    patch = random_maps(n=1, h=6, w=6, seed=1)
    patch[0, :3, :3] = 0.5  # the window centred on (1, 1) is constant
    assert R.rank_gaussian_filter(patch, 3)[0, 1, 1] == pytest.approx(0.5, abs=1e-15)


def test_rgf_non_positive_window_mean_gives_zero():
    np.testing.assert_array_equal(R.rank_gaussian_filter(np.zeros((2, 4, 4)), 3), 0.0)


def test_rgf_rank_weights_between_median_and_mean():
    win = np.array([[[0.1, 0.2, 0.9], [0.3, 0.25, 0.4], [0.15, 0.35, 0.5]]])
    out = R.rank_gaussian_filter(win, 3)[0, 1, 1]
    v = np.sort(win.ravel())
    assert min(np.median(v), v.mean()) <= out <= max(np.median(v), v.mean())


def test_parity_g_akd_kernel_formula():
    for sigma in np.linspace(0.0, 1.0, 41):
        for size in (14, 24, 42, 100, 512, 1024):
            assert R.akd_kernel_size(2, sigma, size) == 3  # reference: T = floor(1/0.5), S = h
    assert R.akd_kernel_size(32, 0.2, 640) == 7  # paper intent: 32 steps, S in pixels
    assert R.akd_kernel_size(32, 1.0, 1024) == 11  # clamp
    assert R.akd_kernel_size(16, 0.2, 512) == 3


def test_akd_kernel_sizes_vectorised_matches_scalar():
    maps = random_maps(n=12, seed=2) * np.linspace(0.05, 1.0, 12)[:, None, None]
    for cfg in (R.RefineConfig(), R.RefineConfig(akd_steps=32, akd_size=640),
                R.RefineConfig(akd_steps=24, akd_size=300), R.RefineConfig(akd_kernel=5)):
        got = R.akd_kernel_sizes(maps, cfg)
        size = maps.shape[1] if cfg.akd_size is None else cfg.akd_size
        want = [cfg.akd_kernel or R.akd_kernel_size(cfg.akd_steps, float(np.std(m)), size)
                for m in maps]
        assert got.tolist() == want
    assert set(R.akd_kernel_sizes(maps, R.RefineConfig()).tolist()) == {3}


# ----------------------------------------------------------------------------- percentiles

def test_sorted_percentile_matches_numpy():
    rng = np.random.default_rng(7)
    x = rng.random((40, 23))
    x[rng.random(x.shape) < 0.3] = 0.0
    x[0] = 0.0  # no non-zero value
    x[1, 1:] = 0.0  # a single non-zero value
    q = rng.choice([0.0, 5.0, 50.0, 60.0, 75.0, 80.0, 85.0, 90.0, 100.0], size=40)
    got = R.sorted_percentile(np.sort(x, axis=1), (x <= 0).sum(axis=1), q)
    for row, qq, g in zip(x, q, got):
        nz = row[row > 0]
        if nz.size == 0:
            assert np.isnan(g)
        else:
            assert g == pytest.approx(np.percentile(nz, qq), abs=1e-15)
    all_p = R.sorted_percentile(np.sort(x, axis=1), 0, 60.0)
    np.testing.assert_allclose(all_p, np.percentile(x, 60, axis=1), atol=1e-15)


# ----------------------------------------------------------------------------- DACG

def test_dacg_regimes_and_thresholds_match_loop():
    rng = np.random.default_rng(4)
    base = rng.random((4, 8, 8))
    maps = np.stack([
        (base[0] > 0.5).astype(float),  # std 0.5 > 0.22        -> 90
        0.5 + 0.1 * base[1],  # mean > 0.35, low std              -> 75
        0.1 * base[2],  # mean < 0.25                             -> 80
        0.25 + 0.1 * base[3],  # mean in [0.25, 0.35]             -> 85
    ])
    cfg = R.RefineConfig()
    alpha, zeta = R.dacg_thresholds(maps, cfg)
    assert alpha.tolist() == [90.0, 75.0, 80.0, 85.0]
    for m, a, z in zip(maps, alpha, zeta):
        assert (a, z) == L.dacg_threshold_loop(m, cfg)
    _, zeta0 = R.dacg_thresholds(np.zeros((1, 3, 3)), cfg)
    assert zeta0[0] == 1e-6


def test_parity_b_dacg_reference_mode_is_identity_and_spatial_is_not():
    maps = random_maps(seed=11)
    ref = R.dacg(maps, R.RefineConfig(dacg_mode="reference_identity"))
    np.testing.assert_array_equal(ref, maps)
    spatial = R.dacg(maps, R.RefineConfig(dacg_mode="spatial"))
    assert np.abs(spatial - maps).max() > 1e-4
    # The reference blurs the low values as an N x 1 column with a 3-tap kernel running along
    # the width-1 axis: whatever the border rule, that returns the column unchanged.
    taps = R.gaussian_kernel_1d(3, 0.3)
    column = maps[0].ravel()[:, None]
    for mode in ("mirror", "nearest", "reflect"):
        np.testing.assert_allclose(ndimage.correlate1d(column, taps, axis=1, mode=mode),
                                   column, rtol=0, atol=1e-15)


def test_dacg_spatial_matches_loop_and_only_touches_low_pixels():
    cfg = R.RefineConfig(dacg_mode="spatial")
    maps = random_maps(n=6, seed=12)
    out = R.dacg(maps, cfg)
    np.testing.assert_array_equal(out, np.stack([L.dacg_loop(m, cfg) for m in maps]))
    _, zeta = R.dacg_thresholds(maps, cfg)
    high = maps > zeta[:, None, None]
    assert high.any() and (~high).any()
    np.testing.assert_array_equal(out[high], maps[high])
    wide = R.dacg(maps, R.RefineConfig(dacg_mode="spatial", dacg_sigma=1.0))
    assert np.abs(wide - maps).max() > np.abs(out - maps).max()


def test_gaussian_blur_is_3x3_gaussian_with_reflect101_borders():
    maps = random_maps(n=2, h=5, w=6, seed=13)
    taps = R.gaussian_kernel_1d(3, 0.3)
    assert taps[1] == pytest.approx(0.9923, abs=1e-4)  # spec: centre weight ~0.9923 per axis
    kernel = np.outer(taps, taps)
    want = np.stack([ndimage.correlate(m, kernel, mode="mirror") for m in maps])  # mirror = reflect-101
    np.testing.assert_allclose(R.gaussian_blur_reflect101(maps, 0.3, 3), want, atol=1e-15)


# ----------------------------------------------------------------------------- CBA

def test_parity_c_cba_closed_form_equals_reference_branchy_form():
    cfg = R.RefineConfig()
    maps = random_maps(n=8, seed=21, zeros=0.1)
    tau = R.cba_tau(maps, cfg)
    dead = (maps > 0) & (maps < 0.2 * tau[:, None, None])
    assert dead.any(), "the x0.3 branch must be exercised"
    out = R.cba(maps, cfg)
    np.testing.assert_allclose(out, np.stack([L.cba_branchy(m, cfg) for m in maps]), atol=1e-15)
    for m, t in zip(maps, tau):
        assert t == pytest.approx(L.cba_tau_loop(m, cfg), abs=1e-15)
    bg = maps < tau[:, None, None]
    ratio = out[bg & (maps > 0)] / maps[bg & (maps > 0)]
    assert ratio.min() >= 0.5 - 1e-12 and ratio.max() <= 1.0
    np.testing.assert_array_equal(out[~bg], maps[~bg])


def test_cba_tau_formula_by_hand():
    m = np.array([[[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]]])
    nz = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    want = 0.15 * 0.6 + 0.15 * np.percentile(m, 60) + 0.2 * nz.mean() + 0.015 * 1.0
    assert R.cba_tau(m)[0] == pytest.approx(want, abs=1e-15)
    assert R.cba_tau(np.zeros((1, 2, 2)))[0] == 1e-6


def test_clip_and_normalise_matches_loop():
    maps = random_maps(n=4, seed=22) * 1.3 - 0.1
    raw_max = np.array([0.9, 1.0, 0.5, 2.0])
    out = R.clip_and_normalise(maps, raw_max)
    for m, rm, o in zip(maps, raw_max, out):
        np.testing.assert_allclose(o, L.clip_normalise_loop(m, rm, 1e-8), atol=1e-15)
    flat = R.clip_and_normalise(np.full((1, 3, 3), 0.4), [1.0])
    np.testing.assert_array_equal(flat, 0.4)


# ----------------------------------------------------------------------------- SICD

def test_parity_d_sicd_alpha_is_min_of_closed_form_and_cap():
    cfg = R.RefineConfig()
    maps = random_maps(n=3, seed=31)
    rho = np.array([3 / 64, 0.1, 0.0])
    flat = maps.reshape(3, -1)
    theta = flat.mean(1) + 2 * flat.std(1)
    interf = 0.05 * rho[:, None] + 0.02 * (flat > theta[:, None])
    closed = R.sicd_alpha(maps, interf.reshape(maps.shape))
    for h, i, a in zip(flat, interf, closed):
        brent = minimize_scalar(lambda s: float(((h - s * i) ** 2).sum())).x
        assert a == pytest.approx(brent, rel=1e-6)
        assert a > 0.5  # the cap is always active on a normal map (METHOD.md §3.6)
    out = R.sicd(maps, rho, cfg)
    want = np.maximum(flat - np.minimum(closed, 0.5)[:, None] * interf, 0.0).reshape(maps.shape)
    np.testing.assert_allclose(out, want, atol=1e-15)
    for m, r, o in zip(maps, rho, out):
        np.testing.assert_allclose(o, L.sicd_loop(m, r, cfg), atol=1e-15)


def test_sicd_range_guard_and_zero_interference_keep_input():
    cfg = R.RefineConfig()
    m = np.full((1, 4, 4), 0.02)
    m[0, 0, 0] = 0.05  # range shrinks from 0.03 to 0.02 (< 0.9x): the guard keeps H
    np.testing.assert_array_equal(R.sicd(m, [0.5], cfg), m)
    const = np.full((1, 3, 3), 0.3)  # no outlier and no repeats: I == 0
    np.testing.assert_array_equal(R.sicd(const, [0.0], cfg), const)
    loose = R.RefineConfig(sicd_range_guard=0.0)
    assert not np.array_equal(R.sicd(m, [0.5], loose), m)


def test_repeat_ratio_token_modes():
    eos, pad = 2, 0
    canvas = [5, 7, 5, 9, eos, eos, eos]
    assert R.repeat_ratio([canvas], 1, "parity")[0] == pytest.approx(2 / 7)  # {5, eos}
    assert R.repeat_ratio([canvas], 1, "clean", eos_id=eos)[0] == pytest.approx(1 / 4)  # {5}
    assert R.repeat_ratio([canvas], 1, "clean", eos_id=eos, function_word_ids={7})[0] == 0.0
    assert R.repeat_ratio([[pad, 4, pad, 4, 6]], 1, "clean", pad_id=pad)[0] == pytest.approx(1 / 3)
    assert R.repeat_ratio([[eos, 3]], 1, "clean", eos_id=eos)[0] == 0.0  # empty answer
    with pytest.raises(ValueError):
        R.repeat_ratio([[1, 2]], 2, "parity")


def test_repeat_ratio_matches_loop_on_random_ragged_ids():
    rng = np.random.default_rng(41)
    rows = [rng.integers(0, 12, size=rng.integers(0, 30)).tolist() for _ in range(25)]
    for mode, fw in (("parity", None), ("clean", None), ("clean", (3, 4, 5))):
        got = R.repeat_ratio(rows, len(rows), mode, eos_id=2, pad_id=0, function_word_ids=fw)
        want = [L.repeat_ratio_loop(r, mode, 2, 0, fw) for r in rows]
        np.testing.assert_allclose(got, want, atol=1e-15)
    square = np.array([r[:5] + [1] * (5 - len(r[:5])) for r in rows])
    np.testing.assert_array_equal(R.repeat_ratio(square, 25, "parity"),
                                  R.repeat_ratio(square.tolist(), 25, "parity"))


# ----------------------------------------------------------------------------- wrapper

CONFIGS = [
    R.RefineConfig(sicd_eos_id=2),
    R.RefineConfig.parity(),
    R.RefineConfig(akd_steps=32, akd_size=640, dacg_mode="spatial", sicd_eos_id=2),
    R.RefineConfig(dacg=False, sicd=False),
    R.RefineConfig(akd=False, cba=False, dacg_mode="spatial", sicd_tokens="parity"),
    R.RefineConfig(akd=False, dacg=False, cba=False, sicd_function_word_ids=(3, 4)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.label()}-{c.dacg_mode}-{c.sicd_tokens}")
def test_refine_batch_matches_loop_reference(cfg):
    maps = random_maps(n=6, seed=51).astype(np.float32)
    ids = np.random.default_rng(52).integers(2, 9, size=(6, 16))
    out = R.refine_batch(maps, cfg, ids)
    assert out.dtype == np.float32 and out.shape == maps.shape
    np.testing.assert_allclose(out, L.refine_batch_loop(maps, cfg, ids), rtol=0, atol=1e-6)


def test_labels():
    assert R.RefineConfig().label() == "akd+dacg+cba+sicd"
    assert R.RefineConfig(akd=False, dacg=False, cba=False, sicd=False).label() == "none"
    assert R.RefineConfig(dacg=False, cba=False).label() == "akd+sicd"
    with pytest.raises(ValueError):
        R.RefineConfig(dacg_mode="blur")
    with pytest.raises(ValueError):
        R.RefineConfig(akd_kernel=4)


def test_none_returns_input_and_sicd_needs_tokens():
    maps = random_maps(n=2).astype(np.float32)
    off = R.RefineConfig(akd=False, dacg=False, cba=False, sicd=False)
    np.testing.assert_array_equal(R.refine_batch(maps, off), maps)
    with pytest.raises(ValueError, match="token_ids"):
        R.refine_batch(maps, R.RefineConfig())


@pytest.mark.parametrize("value", [0.0, 0.6])
def test_constant_and_all_zero_maps_give_finite_output(value):
    maps = np.full((3, 6, 6), value, dtype=np.float32)
    for cfg in (R.RefineConfig(), R.RefineConfig.parity()):
        out = R.refine_batch(maps, cfg, [[1, 1, 2]] * 3)
        assert np.isfinite(out).all() and out.min() >= 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
    maps = random_maps(n=2)
    maps[1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        R.refine_batch(maps, R.RefineConfig(), [[1]] * 2)
    for fn in (lambda m: R.rank_gaussian_filter(m, 3), R.dacg, R.cba,
               lambda m: R.sicd(m, [0.1, 0.1])):
        with pytest.raises(ValueError):
            fn(maps)


def test_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        R.refine_batch(np.zeros((4, 4)), R.RefineConfig(sicd=False))


def test_batch_of_8_equals_8_single_calls():
    maps = random_maps(n=8, h=9, w=11, seed=61).astype(np.float32)
    ids = np.random.default_rng(62).integers(2, 7, size=(8, 12))
    for cfg in (R.RefineConfig(sicd_eos_id=2), R.RefineConfig.parity()):
        batch = R.refine_batch(maps, cfg, ids)
        singles = np.concatenate([R.refine_batch(maps[i:i + 1], cfg, ids[i:i + 1]) for i in range(8)])
        np.testing.assert_array_equal(batch, singles)


def test_bench_smoke_reports_agreement():
    res = run_bench_refine(n_maps=4, h=6, w=7, seed=1, vec_repeats=2)
    assert set(res) == {"n_maps", "speedup", "max_abs_diff", "vectorised_s", "loop_s", "vec_repeats", "loop_repeats"}
    assert res["n_maps"] == 4 and res["max_abs_diff"] <= 1e-6
    with pytest.raises(ValueError, match="repeats"):
        run_bench_refine(n_maps=2, h=4, w=4, loop_repeats=0)


# ----------------------------------------------------------------------------- SICD token set (issue 13, defect 3)

def test_sicd_token_ids_parity_is_the_raw_canvas_clean_is_the_response():
    canvas = [5, 6, 7, 2, 0, 0, 0]  # response 5 6 7, end token 2, padding 0
    assert R.sicd_token_ids(canvas, 3, "parity") == canvas
    assert R.sicd_token_ids(canvas, 3, "clean") == [5, 6, 7]
    with pytest.raises(ValueError, match="outside"):
        R.sicd_token_ids(canvas, 8, "clean")
    with pytest.raises(ValueError, match="token mode"):
        R.sicd_token_ids(canvas, 3, "raw")


def test_refine_explained_parity_uses_the_padded_canvas_as_the_reference():
    maps = random_maps(n=4, seed=11)
    canvases = [[5, 6, 7, 2, 0, 0, 0, 0]] * 4
    cfg = R.RefineConfig.parity(akd=False, sicd_eos_id=2)
    got = R.refine_explained(maps, cfg, canvases, [3] * 4)
    np.testing.assert_array_equal(got, R.refine_batch(maps, cfg, token_ids=canvases))
    # the token set the pipeline passed before (response + one end token) gives other maps
    assert not np.allclose(got, R.refine_batch(maps, cfg, token_ids=[[5, 6, 7, 2]] * 4))


def test_refine_explained_clean_equals_the_response_with_its_end_token():
    maps = random_maps(n=4, seed=12)
    canvases = [[5, 5, 7, 2, 0, 0], [5, 6, 7, 8, 2, 2], [9, 2, 9, 9, 9, 9], [4, 4, 4, 4, 4, 4]]
    lengths = [3, 4, 1, 6]
    cfg = R.RefineConfig(sicd_eos_id=2)
    expected = R.refine_batch(maps, cfg, token_ids=[c[:n] + [2] for c, n in zip(canvases, lengths)])
    np.testing.assert_array_equal(R.refine_explained(maps, cfg, canvases, lengths), expected)
    with pytest.raises(ValueError, match="one canvas"):
        R.refine_explained(maps, cfg, canvases[:3], lengths)
