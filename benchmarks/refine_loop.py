"""Plain per-pixel Python-loop implementations of the refinement maths (METHOD.md §3).

These are the slow, obviously-correct twins of `actors.refine`: one map at a time, one pixel at
a time, numpy only for per-window sorting and per-map percentiles. They exist to check the
vectorised kernels (unit tests) and to time them (`actors.bench_refine`). They follow the same
fixed semantics as `actors.refine` (constant window -> mean, no noise, closed-form alpha);
`cba_branchy` additionally reproduces the reference's branchy CBA, dead x0.3 branch included.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from dcam.actors.refine import RefineConfig, akd_kernel_size


def reflect101(i: int, n: int) -> int:
    """Index into a length-n axis with reflect-101 borders (cv2 default, numpy 'reflect')."""
    if n == 1:
        return 0
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def rgf_loop(m: np.ndarray, k: int) -> np.ndarray:
    """Rank Gaussian filter of one (h, w) map, one pixel at a time (METHOD.md §3.2).

    Float operations are in the same order as refine._rgf_chunk (window raster order for the
    sums, the same exp recurrence for the weights), so the results are bit-identical.
    """
    h, w = m.shape
    p, n_win = k // 2, k * k
    c = n_win // 2
    out = np.zeros((h, w), dtype=np.float64)
    for i in range(h):
        for j in range(w):
            win = [float(m[reflect101(i + a, h), reflect101(j + b, w)])
                   for a in range(-p, p + 1) for b in range(-p, p + 1)]
            acc = 0.0
            for v in win:
                acc = acc + v
            mu = acc / n_win
            if mu <= 0:
                continue
            acc = 0.0
            for v in win:
                acc = acc + (v - mu) * (v - mu)
            sd = math.sqrt(acc / n_win)
            if sd == 0:  # constant window: the reference's 0/0 NaN; here the mean
                out[i, j] = mu
                continue
            cv = sd / mu
            ranked = sorted(win)
            e1 = float(np.exp(-(1.0 / (2.0 * (cv * cv)))))  # np.exp: same libm as the batch
            e2 = e1 * e1
            num, g_sum, g, odd = ranked[c], 0.0, 1.0, e1
            for r in range(1, c + 1):  # g = exp(-r^2 / (2 cv^2)) by recurrence
                g = g * odd
                odd = odd * e2
                num = num + g * (ranked[c - r] + ranked[c + r])
                g_sum = g_sum + g
            out[i, j] = num / (1.0 + 2.0 * g_sum)
    return out


def rgf_loop_direct(m: np.ndarray, k: int) -> np.ndarray:
    """RGF of one map straight from the spec's formula (explicit exp per rank, no recurrence),
    for checking the recurrence; agrees with rgf_loop to rounding."""
    h, w = m.shape
    p, n_win = k // 2, k * k
    out = np.zeros((h, w), dtype=np.float64)
    for i in range(h):
        for j in range(w):
            win = sorted(float(m[reflect101(i + a, h), reflect101(j + b, w)])
                         for a in range(-p, p + 1) for b in range(-p, p + 1))
            mu = float(np.mean(win))
            sd = float(np.std(win))
            if mu <= 0:
                continue
            if sd == 0:
                out[i, j] = mu
                continue
            sigma = sd / mu
            g = [math.exp(-((n - n_win // 2) ** 2) / (2 * sigma ** 2)) for n in range(n_win)]
            out[i, j] = sum(gi * v for gi, v in zip(g, win)) / sum(g)
    return out


def akd_loop(m: np.ndarray, cfg: RefineConfig, raw: np.ndarray) -> np.ndarray:
    if cfg.akd_kernel is not None:
        k = cfg.akd_kernel
    else:
        size = raw.shape[0] if cfg.akd_size is None else cfg.akd_size
        k = akd_kernel_size(cfg.akd_steps, float(np.std(raw)), float(size), cfg.akd_k_base,
                            cfg.akd_k_min, cfg.akd_k_max)
    return rgf_loop(m, k)


def dacg_threshold_loop(m: np.ndarray, cfg: RefineConfig) -> tuple[float, float]:
    mu, sd = float(np.mean(m)), float(np.std(m))
    q1, q2, q3, q4 = cfg.dacg_percentiles
    if sd > cfg.dacg_std_thresh:
        alpha = q1
    elif mu > cfg.dacg_mean_high:
        alpha = q2
    elif mu < cfg.dacg_mean_low:
        alpha = q3
    else:
        alpha = q4
    nz = m[m > 0]
    if nz.size == 0:
        return alpha, cfg.dacg_min_thresh
    return alpha, max(float(np.percentile(nz, alpha)), cfg.dacg_min_thresh)


def dacg_loop(m: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """DACG of one map; spatial mode blurs each low pixel with a separable 3x3 reflect-101 sum
    (vertical taps then horizontal, the same order as the batch version)."""
    if cfg.dacg_mode == "reference_identity":
        return m.astype(np.float64).copy()
    _, zeta = dacg_threshold_loop(m, cfg)
    s2 = cfg.dacg_sigma * cfg.dacg_sigma
    g = [float(v) for v in np.exp(np.array([-1.0, 0.0, -1.0]) / (2.0 * s2))]
    total = g[0] + g[1] + g[2]
    g = [v / total for v in g]
    h, w = m.shape
    out = m.astype(np.float64).copy()
    for i in range(h):
        for j in range(w):
            if m[i, j] > zeta:
                continue
            acc = 0.0
            for b in range(3):
                col = reflect101(j + b - 1, w)
                vert = 0.0
                for a in range(3):
                    vert = vert + g[a] * float(m[reflect101(i + a - 1, h), col])
                acc = acc + g[b] * vert
            out[i, j] = acc
    return out


def cba_tau_loop(m: np.ndarray, cfg: RefineConfig) -> float:
    nz = m[m > 0]
    if nz.size == 0:
        return cfg.cba_empty_tau
    return (cfg.cba_w_median_nz * float(np.percentile(nz, cfg.cba_q_median))
            + cfg.cba_w_p60_all * float(np.percentile(m, cfg.cba_q_all))
            + cfg.cba_w_mean_nz * float(np.mean(nz)) + cfg.cba_w_max * float(np.max(m)))


def cba_branchy(m: np.ndarray, cfg: RefineConfig, dead_frac: float = 0.2,
                dead_mult: float = 0.3) -> np.ndarray:
    """The reference's CBA, branch for branch, including the dead x0.3 branch (METHOD.md §3.4)."""
    tau = cba_tau_loop(m, cfg)
    out = m.astype(np.float64).copy()
    h, w = m.shape
    for i in range(h):
        for j in range(w):
            e = float(m[i, j])
            if not e < tau:
                continue
            s = min(max(e / tau, 0.0), 1.0)
            if e < dead_frac * tau:
                s = dead_mult * s
            s = min(max(s, cfg.cba_floor), 1.0)
            out[i, j] = e * s
    return out


def clip_normalise_loop(m: np.ndarray, raw_max: float, eps: float) -> np.ndarray:
    out = np.array([[min(max(float(v), 0.0), raw_max) if raw_max >= 0 else raw_max for v in row]
                    for row in m], dtype=np.float64)
    lo, hi = float(out.min()), float(out.max())
    if hi > lo:
        out = (out - lo) / (hi - lo + eps)
    return out


def repeat_ratio_loop(ids, mode: str, eos_id=None, pad_id=None, function_word_ids=None) -> float:
    seq = [int(t) for t in ids]
    if mode == "clean":
        if eos_id is not None and eos_id in seq:
            seq = seq[:seq.index(eos_id)]
        if pad_id is not None:
            seq = [t for t in seq if t != pad_id]
    if not seq:
        return 0.0
    rep = {t for t, c in Counter(seq).items() if c > 1}
    if function_word_ids is not None:
        rep &= set(function_word_ids)
    return len(rep) / len(seq)


def sicd_loop(m: np.ndarray, rho: float, cfg: RefineConfig) -> np.ndarray:
    """SICD of one map with explicit per-pixel loops and the closed-form alpha."""
    h, w = m.shape
    vals = [float(v) for v in m.ravel()]
    mu = sum(vals) / len(vals)
    theta = mu + cfg.sicd_outlier_k * math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
    base = cfg.sicd_repeat_weight * rho if rho > 0 else 0.0
    interf = [base + (cfg.sicd_outlier_weight if v > theta else 0.0) for v in vals]
    if max(interf) == 0:
        return m.astype(np.float64).copy()
    alpha = sum(a * b for a, b in zip(vals, interf)) / sum(b * b for b in interf)
    alpha = min(alpha, cfg.sicd_alpha_cap)
    new = [max(v - alpha * b, 0.0) for v, b in zip(vals, interf)]
    if (max(new) - min(new)) < cfg.sicd_range_guard * (max(vals) - min(vals)):
        return m.astype(np.float64).copy()
    return np.array(new, dtype=np.float64).reshape(h, w)


def refine_one_loop(m: np.ndarray, cfg: RefineConfig, ids=None) -> np.ndarray:
    """One map through the enabled modules (same order and rules as refine.refine_batch)."""
    raw = np.asarray(m, dtype=np.float64)
    if not np.isfinite(raw).all():
        raise ValueError("map contains NaN or Inf")
    if cfg.label() == "none":
        return raw.astype(np.float32)
    x = raw
    if cfg.akd:
        x = akd_loop(x, cfg, raw)
    if cfg.dacg:
        x = dacg_loop(x, cfg)
    if cfg.cba:
        x = cba_branchy(x, cfg)
    x = clip_normalise_loop(x, float(raw.max()), cfg.norm_eps)
    if cfg.sicd:
        rho = repeat_ratio_loop(ids, cfg.sicd_tokens, cfg.sicd_eos_id, cfg.sicd_pad_id,
                                cfg.sicd_function_word_ids)
        x = sicd_loop(x, rho, cfg)
    return x.astype(np.float32)


def refine_batch_loop(maps, cfg: RefineConfig = RefineConfig(), token_ids=None) -> np.ndarray:
    """Loop twin of refine.refine_batch: maps one at a time."""
    maps = np.asarray(maps)
    if cfg.sicd and cfg.label() != "none" and token_ids is None:
        raise ValueError("SICD is enabled but no token_ids were given")
    ids = token_ids if token_ids is not None else [None] * len(maps)
    return np.stack([refine_one_loop(m, cfg, t) for m, t in zip(maps, ids)]) if len(maps) else \
        np.zeros(maps.shape, dtype=np.float32)
