"""Diffusion-CAM refinement modules: AKD, DACG, CBA, post-CBA normalisation, SICD (METHOD.md §3).

Every module is a pure, vectorised function over a batch of maps of shape (N, h, w) at
token-grid resolution. Inputs are any real float array; the maths runs in float64 and the result
has the input's float dtype (float32 in -> float32 out). `refine_batch` chains the enabled modules
in the reference order AKD -> DACG -> CBA -> clip/min-max -> SICD (METHOD.md §3.1) and returns float32.

Deliberate differences from the reference implementation (METHOD.md §3, §8.2), each also commented at
the place where it applies:
- no exception swallowing and no "return the raw map" fallback: bad input raises ValueError;
- no noise injection before the rank filter; a zero-variance window returns its mean (METHOD.md §3.2);
- the AKD kernel size uses explicit inputs (T steps, size S) instead of hard-coded ones (METHOD.md §3.2);
- DACG offers the reference's identity blur and a true 2-D spatial blur (METHOD.md §3.3);
- CBA uses the closed form of the reference's branchy code (METHOD.md §3.4);
- SICD uses the closed-form alpha and an explicit token set (METHOD.md §3.6);
- each module has its own enable flag (SICD is not forced on).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

MODULES = ("akd", "dacg", "cba", "sicd")
DACG_MODES = ("reference_identity", "spatial")
SICD_TOKEN_MODES = ("parity", "clean")
_BLOCK_PIXELS = 12288  # pixels per RGF block (96 KB per float64 temporary: its ~25 stay in cache)
_MAP_BLOCK_PIXELS = 36864  # pixels per block of the per-map modules (fewer temporaries, more calls saved)


@dataclass(frozen=True)
class RefineConfig:
    """Enable flags and every constant of the refinement modules (METHOD.md §3).

    Defaults: every module on, with dcam's clean constants (which modules a method runs is the
    method preset's choice: Diffusion-CAM's default turns AKD off, actors/methods.py);
    `RefineConfig.parity()` gives the reference's behaviour where the two differ (DACG identity
    blur, SICD over the raw canvas).
    """

    akd: bool = True
    dacg: bool = True
    cba: bool = True
    sicd: bool = True
    # AKD (METHOD.md §3.2). k = floor(k_base * f_step * f_std * f_size), odd, clamped to [k_min, k_max].
    akd_k_base: float = 3.0
    akd_steps: float = 2.0  # T, denoising steps. Parity: the reference uses floor(1/0.5) = 2.
    akd_size: float | None = None  # S. None: grid height h in cells (reference). Paper: pixels.
    akd_kernel: int | None = None  # fixed odd kernel size; bypasses the formula when set
    akd_k_min: int = 3
    akd_k_max: int = 11
    # DACG (METHOD.md §3.3)
    dacg_mode: str = "spatial"
    dacg_std_thresh: float = 0.22
    dacg_mean_high: float = 0.35
    dacg_mean_low: float = 0.25
    dacg_percentiles: tuple[float, float, float, float] = (90.0, 75.0, 80.0, 85.0)
    dacg_min_thresh: float = 1e-6
    dacg_sigma: float = 0.3
    # CBA (METHOD.md §3.4): tau = w_med*P50(E>0) + w_p60*P60(E) + w_mean*mean(E>0) + w_max*max(E)
    cba_w_median_nz: float = 0.15
    cba_w_p60_all: float = 0.15
    cba_w_mean_nz: float = 0.20  # reference writes 0.5 * 0.4
    cba_w_max: float = 0.015  # reference writes 0.3 * 0.05
    cba_q_median: float = 50.0
    cba_q_all: float = 60.0
    cba_empty_tau: float = 1e-6
    cba_floor: float = 0.5
    # Post-CBA normalisation (METHOD.md §3.5)
    norm_eps: float = 1e-8
    # SICD (METHOD.md §3.6)
    sicd_tokens: str = "clean"
    sicd_eos_id: int | None = None
    sicd_pad_id: int | None = None
    sicd_function_word_ids: tuple[int, ...] | None = None
    sicd_repeat_weight: float = 0.05
    sicd_outlier_weight: float = 0.02
    sicd_outlier_k: float = 2.0
    sicd_alpha_cap: float = 0.5
    sicd_range_guard: float = 0.9

    def __post_init__(self) -> None:
        if self.dacg_mode not in DACG_MODES:
            raise ValueError(f"dacg_mode must be one of {DACG_MODES}, got {self.dacg_mode!r}")
        if self.sicd_tokens not in SICD_TOKEN_MODES:
            raise ValueError(f"sicd_tokens must be one of {SICD_TOKEN_MODES}, got {self.sicd_tokens!r}")
        if self.akd_kernel is not None and (self.akd_kernel < 1 or self.akd_kernel % 2 == 0):
            raise ValueError(f"akd_kernel must be a positive odd int, got {self.akd_kernel}")
        if len(self.dacg_percentiles) != 4:
            raise ValueError("dacg_percentiles needs four values (one per regime)")

    @classmethod
    def parity(cls, **overrides) -> "RefineConfig":
        """The reference's settings: identity DACG blur, SICD over the raw 64-id canvas."""
        base = {"dacg_mode": "reference_identity", "sicd_tokens": "parity"}
        return cls(**{**base, **overrides})

    def label(self) -> str:
        """'+'-joined enabled modules in application order, or 'none'."""
        on = [m for m in MODULES if getattr(self, m)]
        return "+".join(on) if on else "none"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- helpers

def as_map_batch(maps) -> np.ndarray:
    """Validate a (N, h, w) batch; return it as float64. NaN/Inf or a wrong shape raises."""
    x = np.asarray(maps)
    if x.ndim != 3:
        raise ValueError(f"expected a batch of maps with shape (N, h, w), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"maps must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = np.unique(np.nonzero(~np.isfinite(x).reshape(len(x), -1))[0])
        raise ValueError(f"maps contain NaN or Inf (map indices {bad[:10].tolist()})")
    return x


def _out_dtype(maps) -> np.dtype:
    dt = np.asarray(maps).dtype
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


@functools.lru_cache(maxsize=256)
def _reflect101_index(n: int, p: int) -> np.ndarray:
    """Source indices of a length-n axis padded by p on both sides with reflect-101 borders
    (cv2 BORDER_REFLECT_101 == numpy mode='reflect', also for p >= n)."""
    idx = np.arange(-p, n + p)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def pad_reflect101(x: np.ndarray, p: int) -> np.ndarray:
    """Pad the two trailing axes of (N, h, w) by p with reflect-101 borders (one gather)."""
    ri = _reflect101_index(x.shape[1], p)
    ci = _reflect101_index(x.shape[2], p)
    return x[:, ri[:, None], ci[None, :]]


def sorted_percentile(sorted_rows: np.ndarray, start, q) -> np.ndarray:
    """Row-wise np.percentile(sorted_rows[i, start[i]:], q[i]) with numpy's 'linear' method.

    sorted_rows: (N, P) ascending rows; start: scalar or (N,) first included index, so a
    "non-zero pixels only" percentile is the tail after the non-positive values; q: scalar or
    (N,). Rows with nothing included give NaN. Same virtual index ((n-1) * q/100) and the same
    two-sided lerp as numpy, so the result matches np.percentile.
    """
    n_rows, width = sorted_rows.shape
    if width == 0:
        return np.full(n_rows, np.nan)
    start = np.broadcast_to(np.asarray(start, dtype=np.intp), (n_rows,))
    n = width - start
    q = np.broadcast_to(np.asarray(q, dtype=np.float64), (n_rows,))
    virtual = (n - 1) * (q / 100.0)
    lo = np.floor(virtual)
    gamma = virtual - lo
    last = np.maximum(n - 1, 0)
    lo_i = np.clip(lo.astype(np.intp), 0, last)
    hi_i = np.minimum(lo_i + 1, last)
    rows = np.arange(n_rows)
    a = sorted_rows[rows, np.minimum(start + lo_i, width - 1)]
    b = sorted_rows[rows, np.minimum(start + hi_i, width - 1)]
    diff = b - a
    out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return np.where(n > 0, out, np.nan)


# ----------------------------------------------------------------------------- AKD (METHOD.md §3.2)

def akd_kernel_size(steps: float, map_std: float, size: float, k_base: float = 3.0,
                    k_min: int = 3, k_max: int = 11) -> int:
    """Adaptive AKD kernel size (METHOD.md §3.2).

    steps: T, the number of denoising steps (the reference passes floor(1/0.5) = 2, not the
      real 32 steps). map_std: population std of the raw map. size: S (the reference passes the
      grid height in cells; the paper's intent is the image side in pixels).
    k = floor(k_base * min(T/16, 2) * min(5*std, 2) * min(S/512, 1.5)); even -> +1; clamp.
    With the reference inputs this is 3 for every map; with T=32, S=640, std=0.2 it is 7.
    """
    f_step = min(steps / 16.0, 2.0)
    f_std = min(5.0 * map_std, 2.0)
    f_size = min(size / 512.0, 1.5)
    k = int(math.floor(k_base * f_step * f_std * f_size))
    if k % 2 == 0:
        k += 1
    return int(min(max(k, k_min), k_max))


def akd_kernel_sizes(raw_maps, cfg: RefineConfig) -> np.ndarray:
    """Per-map kernel sizes (N,) from the raw maps' std and the config's explicit T and S.

    Vectorised twin of `akd_kernel_size` (same float operations in the same order).
    """
    x = as_map_batch(raw_maps)
    if cfg.akd_kernel is not None:
        return np.full(len(x), cfg.akd_kernel, dtype=np.int64)
    size = float(x.shape[1]) if cfg.akd_size is None else float(cfg.akd_size)
    stds = x.reshape(len(x), -1).std(axis=1) if x.size else np.zeros(len(x))
    f_step = min(cfg.akd_steps / 16.0, 2.0)
    f_size = min(size / 512.0, 1.5)
    k = np.floor(cfg.akd_k_base * f_step * np.minimum(5.0 * stds, 2.0) * f_size).astype(np.int64)
    k = np.where(k % 2 == 0, k + 1, k)
    return np.clip(k, cfg.akd_k_min, cfg.akd_k_max).astype(np.int64)


@functools.lru_cache(maxsize=None)
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs of Batcher's odd-even merge sort for n inputs (pairs that touch
    the padding up to the next power of two are dropped: padding acts as +inf and never moves)."""
    p2 = 1
    while p2 < n:
        p2 *= 2
    pairs, p = [], 1
    while p < p2:
        k = p
        while k >= 1:
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in pairs if b < n)


def _sort_planes_inplace(planes: list[np.ndarray]) -> list[np.ndarray]:
    """Sort k*k same-shape contiguous arrays elementwise (consuming them): result[n][pix] =
    n-th smallest window value at pix. Batcher network of np.minimum/np.maximum for up to 25
    planes. (Working on strided views of the padded map instead of copies is slower: numpy's
    inner loops then run over one map row at a time.)"""
    m = len(planes)
    if m > 25:  # a sorting network stops paying off; sort the stacked windows instead
        win = np.sort(np.stack(planes, axis=-1), axis=-1)
        return [win[..., i] for i in range(m)]
    ranked = list(planes)
    tmp = np.empty_like(ranked[0])
    for a, b in batcher_network(m):  # in-place compare-exchange: a <- min, b <- max
        np.minimum(ranked[a], ranked[b], out=tmp)
        np.maximum(ranked[a], ranked[b], out=ranked[b])
        ranked[a], tmp = tmp, ranked[a]
    return ranked


def _rank_gaussian_weighted_sum(ranked: list[np.ndarray], cv: np.ndarray) -> np.ndarray:
    """sum_n g_n w_(n) / sum_n g_n with g_n = exp(-r_n^2 / (2 cv^2)), r_n = n - floor(m/2).

    g is symmetric in r and built by the recurrence g_r = g_{r-1} * e^{-(2r-1)a},
    a = 1/(2 cv^2): one exp per pixel instead of m. cv must be > 0 where the result is used.
    Accumulation order: num = w_(c) + sum_r g_r (w_(c-r) + w_(c+r)), den = 1 + 2 sum_r g_r.
    """
    safe_cv = np.where(cv > 0, cv, 1.0)
    np.multiply(safe_cv, safe_cv, out=safe_cv)
    safe_cv *= 2.0
    np.divide(1.0, safe_cv, out=safe_cv)
    np.negative(safe_cv, out=safe_cv)
    odd = np.exp(safe_cv, out=safe_cv)  # e1 = exp(-(1 / (2 cv^2)))
    e2 = odd * odd
    c = len(ranked) // 2
    num, g_sum = ranked[c].copy(), np.zeros_like(cv)
    g, pair = np.ones_like(cv), np.empty_like(cv)
    for r in range(1, c + 1):  # in place: the same float operations, no temporaries
        g *= odd
        odd *= e2
        np.add(ranked[c - r], ranked[c + r], out=pair)
        pair *= g
        num += pair
        g_sum += g
    g_sum *= 2.0
    g_sum += 1.0
    num /= g_sum
    return num


def _rgf_chunk(x: np.ndarray, k: int) -> np.ndarray:
    """Rank Gaussian filter of a float64 (n, h, w) chunk with one kernel size k."""
    _, h, w = x.shape
    p, m = k // 2, k * k
    padded = pad_reflect101(x, p)  # reflect without repeating the edge, as numpy mode="reflect"
    planes = [padded[:, a:a + h, b:b + w].copy() for a in range(k) for b in range(k)]
    # Window sums run in raster order with the same float operations as
    # benchmarks.refine_loop.rgf_loop, so both give bit-identical results: the DACG percentile gate
    # downstream compares pixels with a data value, where a last-bit difference could flip a
    # pixel between the two implementations.
    acc = planes[0].copy()
    for v in planes[1:]:
        acc += v
    mu = acc / m
    dev = np.empty_like(mu)
    acc.fill(0.0)
    for v in planes:  # population std, two-pass: sqrt(sum((v - mu)^2) / m)
        np.subtract(v, mu, out=dev)
        np.multiply(dev, dev, out=dev)
        acc += dev
    acc /= m
    sd = np.sqrt(acc, out=acc)
    positive = mu > 0
    cv = np.divide(sd, np.where(positive, mu, 1.0), out=sd)
    cv *= positive  # cv = 0 where mu <= 0 (sd is finite, so this is exact)
    out = _rank_gaussian_weighted_sum(_sort_planes_inplace(planes), cv)
    # Reference: 0/0 = NaN on a constant positive window (then a silent raw-map fallback).
    # Here a zero-variance window returns its mean, and no noise is injected to avoid it.
    np.copyto(out, mu, where=cv <= 0)
    np.copyto(out, 0.0, where=~positive)
    return out


def _blocks(n_maps: int, pixels_per_map: int, block_pixels: int = _BLOCK_PIXELS):
    """Slices of about block_pixels pixels: temporaries stay small and cache-resident."""
    step = max(1, block_pixels // max(1, pixels_per_map))
    return [slice(s, s + step) for s in range(0, n_maps, step)]


def _rgf(x: np.ndarray, ks: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for kk in np.unique(ks):
        idx = np.nonzero(ks == kk)[0]
        for sl in _blocks(len(idx), x.shape[1] * x.shape[2]):
            sel = idx[sl]
            out[sel] = _rgf_chunk(x[sel], int(kk))
    return out


def rank_gaussian_filter(maps, k: int | Sequence[int] = 3) -> np.ndarray:
    """Rank Gaussian filter (RGF, METHOD.md §3.2) of a (N, h, w) batch.

    Per pixel: the k x k window (numpy 'reflect' padding), sorted; mu = mean, cv = std/mu
    (population std); weights exp(-r^2 / (2 cv^2)) over rank offsets r centred on the median,
    normalised; output = weighted sum. mu <= 0 -> 0; cv == 0 (constant window) -> mu.
    k: one odd size for all maps, or one per map (maps are grouped by size).
    """
    x = as_map_batch(maps)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (len(x),))
    if np.any(ks < 1) or np.any(ks % 2 == 0):
        raise ValueError(f"RGF kernel sizes must be positive odd ints, got {np.unique(ks)}")
    return _rgf(x, ks).astype(_out_dtype(maps), copy=False)


def akd(maps, cfg: RefineConfig = RefineConfig(), raw_maps=None) -> np.ndarray:
    """Adaptive Kernel Denoising (METHOD.md §3.2): RGF with the per-map adaptive kernel size.

    raw_maps: the maps whose std drives the kernel size (the raw maps; default `maps`).
    No noise is injected (the reference adds unseeded 1e-6*max noise only to dodge RGF's NaN).
    """
    sizes = akd_kernel_sizes(maps if raw_maps is None else raw_maps, cfg)
    return rank_gaussian_filter(maps, sizes)


# ----------------------------------------------------------------------------- DACG (METHOD.md §3.3)

def _mean_std_rows(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row mean and population std with the same operations as np.mean / np.std."""
    n = flat.shape[1]
    mu = flat.sum(axis=1) / n
    d = flat - mu[:, None]
    return mu, np.sqrt((d * d).sum(axis=1) / n)


def _dacg_thresholds(flat: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = _mean_std_rows(flat)
    q1, q2, q3, q4 = cfg.dacg_percentiles
    alpha = np.where(sd > cfg.dacg_std_thresh, q1, np.where(
        mu > cfg.dacg_mean_high, q2, np.where(mu < cfg.dacg_mean_low, q3, q4))).astype(np.float64)
    # Non-positive values sort first, so the non-zero pixels are each sorted row's tail.
    p = sorted_percentile(np.sort(flat, axis=1), (flat <= 0).sum(axis=1), alpha)
    zeta = np.where(np.isnan(p), cfg.dacg_min_thresh, np.maximum(p, cfg.dacg_min_thresh))
    return alpha, zeta


def dacg_thresholds(maps, cfg: RefineConfig = RefineConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Per-map regime percentile alpha (N,) and gate threshold zeta (N,) (METHOD.md §3.3).

    mu, sigma over all pixels (zeros included); first match wins: sigma > 0.22 -> 90,
    mu > 0.35 -> 75, mu < 0.25 -> 80, else 85. zeta = max(P_alpha(non-zero pixels), 1e-6),
    numpy linear percentile; no non-zero pixel -> zeta = 1e-6.
    """
    x = as_map_batch(maps)
    return _dacg_thresholds(x.reshape(len(x), -1), cfg)


def gaussian_kernel_1d(ksize: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, centred (same as cv2.getGaussianKernel for sigma > 0)."""
    r = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
    g = np.exp(-(r * r) / (2.0 * (sigma * sigma)))
    return g / g.sum()


def _blur_reflect101(x: np.ndarray, sigma: float, ksize: int) -> np.ndarray:
    g = gaussian_kernel_1d(ksize, sigma)
    p = ksize // 2
    padded = pad_reflect101(x, p)
    h, w = x.shape[1:]
    cols = sum(g[i] * padded[:, i:i + h, :] for i in range(ksize))
    return sum(g[j] * cols[:, :, j:j + w] for j in range(ksize))


def gaussian_blur_reflect101(maps, sigma: float = 0.3, ksize: int = 3) -> np.ndarray:
    """Separable ksize x ksize Gaussian blur of each map, reflect-101 borders (cv2 default).

    Vertical pass first, then horizontal, each summed tap by tap in order (the loop twin in
    benchmarks.refine_loop uses the same order, so the two agree bit for bit).
    """
    return _blur_reflect101(as_map_batch(maps), sigma, ksize).astype(_out_dtype(maps), copy=False)


def _dacg(x: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    if cfg.dacg_mode == "reference_identity" or x.size == 0:
        return x.copy()
    _, zeta = _dacg_thresholds(x.reshape(len(x), -1), cfg)
    low = x <= zeta[:, None, None]
    return np.where(low, _blur_reflect101(x, cfg.dacg_sigma, 3), x)


def dacg(maps, cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """Distribution-Aware Confidence Gating (METHOD.md §3.3).

    High set H = {F > zeta} is kept; the low set L gets the 3x3 Gaussian (sigma cfg.dacg_sigma,
    reflect-101 borders, convolution over the full map) in `spatial` mode. In
    `reference_identity` mode the output equals the input: the reference blurs the L values as
    an N x 1 column with ksize (3, 1), i.e. along the width-1 axis, which is an exact identity.
    """
    return _dacg(as_map_batch(maps), cfg).astype(_out_dtype(maps), copy=False)


# ----------------------------------------------------------------------------- CBA (METHOD.md §3.4)

def _cba_tau(flat: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    if flat.shape[1] == 0:
        return np.full(len(flat), cfg.cba_empty_tau)
    nz = flat > 0
    count = nz.sum(axis=1)
    s = np.sort(flat, axis=1)  # one sort serves both percentiles; non-zero pixels are the tail
    med = sorted_percentile(s, flat.shape[1] - count, cfg.cba_q_median)
    p_all = sorted_percentile(s, 0, cfg.cba_q_all)
    mean_nz = np.where(nz, flat, 0.0).sum(axis=1) / np.maximum(count, 1)
    tau = (cfg.cba_w_median_nz * med + cfg.cba_w_p60_all * p_all
           + cfg.cba_w_mean_nz * mean_nz + cfg.cba_w_max * s[:, -1])
    return np.where(count > 0, tau, cfg.cba_empty_tau)


def cba_tau(maps, cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """Per-map background threshold tau (N,) (METHOD.md §3.4).

    tau = 0.15*P50(E>0) + 0.15*P60(E) + 0.20*mean(E>0) + 0.015*max(E); no E > 0 -> 1e-6.
    P60 is over all pixels (zeros included), the other two over non-zero pixels only.
    """
    x = as_map_batch(maps)
    return _cba_tau(x.reshape(len(x), -1), cfg)


def _cba(x: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    tau = _cba_tau(x.reshape(len(x), -1), cfg)[:, None, None]
    scale = x / tau  # clip(E / tau, floor, 1) without np.clip's wrapper overhead
    np.maximum(scale, cfg.cba_floor, out=scale)
    np.minimum(scale, 1.0, out=scale)
    scale *= x
    return np.where(x < tau, scale, x)


def cba(maps, cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """Contextual Background Attenuation, closed form (METHOD.md §3.4).

    On background B = {E < tau}: E <- E * clip(E/tau, floor, 1); foreground unchanged.
    The reference also multiplies s by 0.3 where E < 0.2*tau, but those pixels have s < 0.2,
    which the 0.5 floor then overrides, so that branch is dead and omitted here.
    """
    return _cba(as_map_batch(maps), cfg).astype(_out_dtype(maps), copy=False)


# ----------------------------------------------------------------------------- METHOD.md §3.5

def _clip_normalise(x: np.ndarray, raw_max: np.ndarray, eps: float) -> np.ndarray:
    if x.size == 0:
        return x.copy()
    # Same as the reference's np.clip(E, 0, max_raw), including hi < 0 (result = hi).
    x = np.minimum(np.maximum(x, 0.0), raw_max[:, None, None])
    flat = x.reshape(len(x), -1)
    lo_v, hi_v = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
    return np.where(hi_v > lo_v, (x - lo_v) / (hi_v - lo_v + eps), x)


def clip_and_normalise(maps, raw_max, eps: float = 1e-8) -> np.ndarray:
    """Post-CBA normalisation (METHOD.md §3.5): clip to [0, max(M_raw)] then, where max > min,
    (E - min) / (max - min + eps). Maps with max == min are left as clipped.
    raw_max: (N,) max of each raw input map. (The reference's unused skewness is dropped.)
    """
    x = as_map_batch(maps)
    hi = np.broadcast_to(np.asarray(raw_max, dtype=np.float64), (len(x),))
    return _clip_normalise(x, hi, eps).astype(_out_dtype(maps), copy=False)


# ----------------------------------------------------------------------------- SICD (METHOD.md §3.6)

def _token_matrix(token_ids, n_maps: int) -> np.ndarray:
    """(N, T) int64 matrix of token ids; short rows are filled with unique negative sentinels."""
    if isinstance(token_ids, np.ndarray) and token_ids.ndim == 2:
        if len(token_ids) != n_maps:
            raise ValueError(f"SICD needs one token-id row per map: {len(token_ids)} for {n_maps} maps")
        if not np.issubdtype(token_ids.dtype, np.integer) or (token_ids < 0).any():
            raise ValueError("token ids must be non-negative integers")
        return token_ids.astype(np.int64, copy=False)
    rows = [np.asarray(list(r), dtype=np.int64).reshape(-1) for r in token_ids]
    if len(rows) != n_maps:
        raise ValueError(f"SICD needs one token-id sequence per map: {len(rows)} for {n_maps} maps")
    width = max([len(r) for r in rows] + [1])
    mat = np.tile(-1 - np.arange(width, dtype=np.int64), (n_maps, 1))
    for i, r in enumerate(rows):
        if np.any(r < 0):
            raise ValueError(f"token ids must be non-negative (row {i})")
        mat[i, :len(r)] = r
    return mat


def repeat_ratio(token_ids, n_maps: int, mode: str = "clean", eos_id: int | None = None,
                 pad_id: int | None = None, function_word_ids=None) -> np.ndarray:
    """rho = |R| / |T| per map (METHOD.md §3.6), R = distinct ids occurring more than once in T.

    token_ids: an (N, T) int array or N sequences of ids (lengths may differ).
    mode 'parity': T = the raw canvas ids as given, EOS/padding included (reference).
    mode 'clean': T = ids before the first `eos_id` (if given), with `pad_id` dropped.
    function_word_ids: if given, only those ids can enter R (|T| is unchanged).
    Empty T -> rho = 0.
    """
    if mode not in SICD_TOKEN_MODES:
        raise ValueError(f"SICD token mode must be one of {SICD_TOKEN_MODES}, got {mode!r}")
    ids = _token_matrix(token_ids, n_maps)
    sentinel = np.broadcast_to(-1 - np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    if mode == "clean":
        drop = np.zeros(ids.shape, dtype=bool)
        if eos_id is not None:
            drop |= np.cumsum(ids == eos_id, axis=1) > 0
        if pad_id is not None:
            drop |= ids == pad_id
        ids = np.where(drop, sentinel, ids)
    length = (ids >= 0).sum(axis=1)
    s = np.sort(ids, axis=1)
    dup = s[:, 1:] == s[:, :-1]  # sentinels are unique, so never duplicates
    run_start = dup & ~np.concatenate([np.zeros((len(s), 1), bool), dup[:, :-1]], axis=1)
    if function_word_ids is not None:
        run_start &= np.isin(s[:, 1:], np.asarray(list(function_word_ids), dtype=np.int64))
    return run_start.sum(axis=1) / np.maximum(length, 1)


def _sicd_alpha(h: np.ndarray, i: np.ndarray) -> np.ndarray:
    ii = (i * i).sum(axis=1)
    return np.where(ii > 0, (h * i).sum(axis=1) / np.where(ii > 0, ii, 1.0), 0.0)


def sicd_alpha(maps, interference) -> np.ndarray:
    """Closed-form argmin_a ||H - a I||^2 = <H, I> / <I, I> per map (0 where I == 0)."""
    h, i = as_map_batch(maps), as_map_batch(interference)
    return _sicd_alpha(h.reshape(len(h), -1), i.reshape(len(i), -1))


def _sicd(x: np.ndarray, rho: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    if x.size == 0:
        return x.copy()
    flat = x.reshape(len(x), -1)
    mu, sd = _mean_std_rows(flat)
    theta = mu + cfg.sicd_outlier_k * sd
    base = np.where(rho > 0, cfg.sicd_repeat_weight * rho, 0.0)
    interf = base[:, None] + cfg.sicd_outlier_weight * (flat > theta[:, None])
    alpha = np.minimum(_sicd_alpha(flat, interf), cfg.sicd_alpha_cap)
    cand = np.maximum(flat - alpha[:, None] * interf, 0.0)
    rng_new = cand.max(axis=1) - cand.min(axis=1)
    rng_old = flat.max(axis=1) - flat.min(axis=1)
    use_new = (interf.max(axis=1) > 0) & ~(rng_new < cfg.sicd_range_guard * rng_old)
    return np.where(use_new[:, None], cand, flat).reshape(x.shape)


def sicd(maps, rho, cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """Single-Instance Causal Debiasing (METHOD.md §3.6) given the repeat ratio rho (N,).

    I = 0.05*rho (if rho > 0) + 0.02*[H > mean + 2 std]; max I == 0 -> H unchanged;
    alpha = min(<H,I>/<I,I>, 0.5) (the reference's Brent search finds the same minimiser);
    H' = max(H - alpha I, 0); keep H if range(H') < 0.9 * range(H).
    """
    x = as_map_batch(maps)
    rho = np.broadcast_to(np.asarray(rho, dtype=np.float64), (len(x),))
    return _sicd(x, rho, cfg).astype(_out_dtype(maps), copy=False)


def sicd_from_tokens(maps, token_ids, cfg: RefineConfig = RefineConfig()) -> np.ndarray:
    """SICD with rho computed from per-map token ids under cfg.sicd_tokens (see repeat_ratio)."""
    rho = repeat_ratio(token_ids, len(maps), cfg.sicd_tokens, cfg.sicd_eos_id,
                       cfg.sicd_pad_id, cfg.sicd_function_word_ids)
    return sicd(maps, rho, cfg)


def sicd_token_ids(canvas_ids: Sequence[int], response_length: int, mode: str) -> list[int]:
    """The ids SICD's repeat ratio is taken over, for a map explained in a sample whose final
    answer canvas is `canvas_ids` and whose response is its first `response_length` ids
    (METHOD.md §3.6). 'parity': the raw canvas exactly as the reference passes it (end token and
    padding included); 'clean': the response (the ids before the first end token).

    The one definition of the token set: the pipeline's probe (for the faithfulness curves) and
    CPU stage (for the written map) and `dcam eval-cam` all go through `refine_explained`."""
    if mode not in SICD_TOKEN_MODES:
        raise ValueError(f"SICD token mode must be one of {SICD_TOKEN_MODES}, got {mode!r}")
    ids = [int(i) for i in canvas_ids]
    if not 0 <= response_length <= len(ids):
        raise ValueError(f"response length {response_length} outside the canvas (length {len(ids)})")
    return ids if mode == "parity" else ids[:response_length]


def refine_explained(raw_maps, cfg: RefineConfig, canvases: Sequence[Sequence[int]],
                     response_lengths: Sequence[int]) -> np.ndarray:
    """`refine_batch` of explained-token maps, each with its sample's final answer canvas and
    response length (SICD's token set: `sicd_token_ids`). Every map of dcam that is refined is
    refined here, so a row's map and the map its faithfulness curves were measured on are the
    same function of the same inputs."""
    if len(canvases) != len(raw_maps) or len(response_lengths) != len(raw_maps):
        raise ValueError(f"one canvas and response length per map: {len(canvases)}, {len(response_lengths)} "
                         f"for {len(raw_maps)} maps")
    ids = [sicd_token_ids(c, n, cfg.sicd_tokens) for c, n in zip(canvases, response_lengths)] if cfg.sicd else None
    return refine_batch(raw_maps, cfg, token_ids=ids)


# ----------------------------------------------------------------------------- wrapper (METHOD.md §3.1)

def refine_batch(maps, cfg: RefineConfig = RefineConfig(), token_ids=None) -> np.ndarray:
    """Apply the enabled modules in the order AKD -> DACG -> CBA -> clip/min-max -> SICD.

    maps: (N, h, w) raw maps, normally min-max normalised to [0, 1] (METHOD.md §2.10); the DACG regime
    thresholds assume that scale. token_ids: one id sequence per map (see repeat_ratio),
    required when SICD is on. With every module off ('none') the input is returned unchanged
    (as float32); otherwise the METHOD.md §3.5 clip/min-max always runs, as in the reference.
    Returns float32 (N, h, w). Unlike the reference, nothing is caught and nothing falls back
    to the raw map: NaN/Inf input or a failing step raises.
    """
    raw = as_map_batch(maps)
    if cfg.label() == "none":
        return raw.astype(np.float32)
    rho = None
    if cfg.sicd:
        if token_ids is None:
            raise ValueError("SICD is enabled but no token_ids were given "
                             "(pass one id sequence per map or disable cfg.sicd)")
        rho = repeat_ratio(token_ids, len(raw), cfg.sicd_tokens, cfg.sicd_eos_id,
                           cfg.sicd_pad_id, cfg.sicd_function_word_ids)
    ksizes = akd_kernel_sizes(raw, cfg) if cfg.akd else None
    out = np.empty(raw.shape, dtype=np.float32)
    # Blocks of ~37k pixels (the RGF inside splits them again into ~12k): temporaries stay
    # cache-sized, several times faster than one pass over a large batch, while the per-map
    # statistics still run over enough maps per numpy call to amortise its overhead.
    for sl in _blocks(len(raw), raw.shape[1] * raw.shape[2], _MAP_BLOCK_PIXELS):
        x = raw[sl]
        if cfg.akd:
            x = _rgf(x, ksizes[sl])
        if cfg.dacg:
            x = _dacg(x, cfg)
        if cfg.cba:
            x = _cba(x, cfg)
        raw_max = raw[sl].reshape(len(x), -1).max(axis=1) if x.size else np.zeros(len(x))
        x = _clip_normalise(x, raw_max, cfg.norm_eps)
        if cfg.sicd:
            x = _sicd(x, rho[sl], cfg)
        out[sl] = x
    return out
