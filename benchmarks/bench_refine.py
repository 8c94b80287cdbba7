"""Benchmark: vectorised refinement (actors.refine) vs the per-pixel loop twin (METHOD.md §3, §8.4).

`run_bench_refine` times `refine_batch` with every module on, once with DACG in `spatial` and
once in `reference_identity` mode, against `refine_loop.refine_batch_loop` on the same
inputs, and reports the speedup and the largest absolute difference of the outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dcam.actors.refine import RefineConfig, refine_batch
from dcam.benchmarks.refine_loop import refine_batch_loop
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit


def make_bench_maps(n_maps: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w) float32 maps in [0, 1]: 1-3 Gaussian blobs plus |noise|, min-max normalised
    like a raw CAM (METHOD.md §2.10)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    maps = np.abs(rng.normal(0.0, 0.05, size=(n_maps, h, w)))
    n_blobs = rng.integers(1, 4, size=n_maps)
    for b in range(3):
        on = (b < n_blobs)[:, None, None]
        cy = rng.uniform(0, h, n_maps)[:, None, None]
        cx = rng.uniform(0, w, n_maps)[:, None, None]
        sd = rng.uniform(0.8, max(1.0, min(h, w) / 4), n_maps)[:, None, None]
        amp = rng.uniform(0.3, 1.0, n_maps)[:, None, None]
        maps += on * amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sd ** 2))
    lo = maps.min(axis=(1, 2), keepdims=True)
    maps = maps - lo
    maps = maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-8)
    return maps.astype(np.float32)


def make_bench_tokens(n_maps: int, length: int = 64, eos_id: int = 2, seed: int = 0) -> np.ndarray:
    """(n, length) canvases: a short random answer, then EOS padding (so padding repeats)."""
    rng = np.random.default_rng(seed + 1)
    ids = np.full((n_maps, length), eos_id, dtype=np.int64)
    lengths = rng.integers(4, length // 2, size=n_maps)
    words = rng.integers(3, 40, size=(n_maps, length))
    cols = np.arange(length)[None, :]
    return np.where(cols < lengths[:, None], words, ids)


def _cpu_time(fn) -> tuple[float, np.ndarray]:
    """CPU time of one fn() call (time.process_time: on a shared machine wall time mostly
    measures the other processes) and its result."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def run_bench_refine(n_maps: int = 1000, h: int = 12, w: int = 12, seed: int = 0,
                     vec_repeats: int = 25, loop_repeats: int = 1) -> dict:
    """Time vectorised vs loop refinement (all modules on, DACG spatial and reference modes).

    Returns {"n_maps", "speedup", "max_abs_diff", "vectorised_s", "loop_s", "vec_repeats",
    "loop_repeats"}; times are CPU seconds of this process, each the best of its repeats
    (timeit's convention: the minimum is the run least disturbed by the rest of the machine),
    summed over the two DACG modes.
    The vectorised side gets more repeats because one run is ~30 ms, where a noisy neighbour
    shows; the loop (~3 s a mode) averages the noise out within one run. The vectorised
    repeats alternate between the two modes, after one warm-up call of each.
    max_abs_diff is over both modes' float32 outputs.
    """
    if vec_repeats < 1 or loop_repeats < 1:
        raise ValueError(f"vec_repeats and loop_repeats must be >= 1, got {vec_repeats} and {loop_repeats}")
    maps = make_bench_maps(n_maps, h, w, seed)
    tokens = make_bench_tokens(n_maps, seed=seed)
    configs = [RefineConfig(dacg_mode="spatial", sicd_eos_id=2),
               RefineConfig.parity(dacg_mode="reference_identity")]
    fast = [refine_batch(maps, cfg, tokens) for cfg in configs]  # warm-up
    loop_best, slow = [float("inf")] * 2, [None, None]
    for _ in range(loop_repeats):
        for j, cfg in enumerate(configs):
            t, slow[j] = _cpu_time(lambda: refine_batch_loop(maps, cfg, tokens))
            loop_best[j] = min(loop_best[j], t)
    vec_best = [float("inf")] * 2
    for _ in range(vec_repeats):
        for j, cfg in enumerate(configs):
            t, fast[j] = _cpu_time(lambda: refine_batch(maps, cfg, tokens))
            vec_best[j] = min(vec_best[j], t)
    max_diff = max(float(np.abs(f.astype(np.float64) - s).max()) for f, s in zip(fast, slow))
    vec_s, loop_s = sum(vec_best), sum(loop_best)
    return {"n_maps": n_maps, "speedup": loop_s / vec_s, "max_abs_diff": max_diff,
            "vectorised_s": vec_s, "loop_s": loop_s, "vec_repeats": vec_repeats, "loop_repeats": loop_repeats}


if __name__ == "__main__":
    print(run_bench_refine())


@dataclass
class BenchRefineConfig:
    """conf/bench_refine.yaml."""
    n_maps: int = key(ge=1)
    h: int = key(ge=1)
    w: int = key(ge=1)
    seed: int = key()
    vec_repeats: int = key(ge=1)
    loop_repeats: int = key(ge=1)


def command(args) -> int:
    """`dcam bench-refine [--json] [k=v ...]`."""
    cfg = to_dict(load_config("bench_refine", args.overrides, schema=BenchRefineConfig))
    emit(run_bench_refine(**cfg), args.json)
    return 0
