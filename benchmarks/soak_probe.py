#!/usr/bin/env python
"""Memory soak of the probe path: does a long-lived ProbeActor + RefineScoreStage leak? (not run in CI)

    python -m dcam.benchmarks.soak_probe [--n 10000] [--batch-size 16] [--faithfulness-steps 8]
                                    [--model-source DIR] [--threads K] [--json]

Streams --n held-out synthetic scenes (actors.scenes.make_scene(seed, i), seed 7000 by default,
i = 0..n-1) through one in-process `actors.probe_actor.ProbeActor` (model_cfg {"backend": "tiny"}:
the shipped weights unless --model-source; methods {"diffusion_cam": {"preset": "diffusion_cam"}};
probe_cfg {"batch_size": 16, "faithfulness_steps": 8}) and one `actors.score_stage.RefineScoreStage`
(the run defaults: thumbnails on, 128 px), exactly as a Ray actor would be fed: decoded batches with
the DecodeStage columns (id, shard, row_index, prompt, response=None so the model generates,
objects, explain=None, pixels, height, width, mask_pixels, status, error, error_kind, notes);
--given-response puts the scene's caption in `response` instead. Outputs are consumed (records
unpickled and counted) and dropped, as the sink does.

The process RSS (psutil when installed, else /proc/self/statm) is sampled before the first batch
and every --sample-every rows (500). Reported: the RSS curve, the warm-up value (the first sample at
or after --warmup rows, 1000: caches, allocator pools and lazily built kernels are in place by then),
the maximum, and the maximum relative growth after warm-up, max(rss after warm-up) / warm-up - 1.
Exit status 1 when that growth exceeds --max-growth (0.10), else 0. --json prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time

import numpy as np

from dcam.actors import scenes
from dcam.pipeline.decode import decoded_batch

METHODS = {"diffusion_cam": {"preset": "diffusion_cam"}}
SINK = {"thumbnails": True, "thumbnail_size": 128}


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_source() -> str:
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        return "/proc/self/statm"


def scene_batch(seed: int, start: int, n: int, shard: str, given: bool = False) -> dict[str, np.ndarray]:
    """Scenes start..start+n-1 as a decoded batch (pipeline/decode.py's output columns); response is
    None (the model generates) unless `given` (the scene's caption is explained)."""
    rows = []
    for i in range(start, start + n):
        s = scenes.make_scene(seed, i)
        h, w = s.image.shape[:2]
        rows.append(dict(id=f"soak-{seed}-{i:07d}", shard=shard, row_index=i, prompt=s.prompt,
                         response=s.caption if given else None,
                         objects=s.objects_json(), explain=None, pixels=np.ascontiguousarray(s.image).tobytes(),
                         height=h, width=w, mask_pixels=s.mask.astype("<u2").tobytes(), status="ok", error=None,
                         error_kind=None, notes=""))
    return decoded_batch(rows)


def growth_stats(curve: list[dict], warmup_rows: int) -> dict:
    """Warm-up RSS (first sample at or after warmup_rows; the last sample if none), max RSS, and the
    maximum relative growth over the warm-up value among the samples after it."""
    after = [c for c in curve if c["rows"] >= warmup_rows] or curve[-1:]
    warm = after[0]
    later = after[1:] or after
    peak_after = max(c["rss_mb"] for c in later)
    return dict(warmup_rows=warm["rows"], warmup_rss_mb=warm["rss_mb"], max_rss_mb=max(c["rss_mb"] for c in curve),
                max_rss_after_warmup_mb=peak_after, final_rss_mb=curve[-1]["rss_mb"],
                max_growth_after_warmup=round(peak_after / warm["rss_mb"] - 1.0, 4))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="scenes to stream (default 10000)")
    ap.add_argument("--seed", type=int, default=7000, help="scene stream (held out; default 7000)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--faithfulness-steps", type=int, default=8)
    ap.add_argument("--model-source", default=None, help="checkpoint dir/URL (default: the shipped tiny weights)")
    ap.add_argument("--given-response", action="store_true",
                    help="explain each scene's caption instead of generating (every sample then has content "
                         "words to explain, even with an untrained checkpoint whose generations may have none)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--json", action="store_true")
    return ap


def _stream(actor, stage, a, log) -> tuple[dict, list[dict]]:
    """Push a.n scenes through probe + refine/score; counts and the RSS curve."""
    shard = f"soak://seed-{a.seed}"
    curve = [dict(rows=0, rss_mb=round(rss_bytes() / 2**20, 1), seconds=0.0)]
    log(f"rss {curve[0]['rss_mb']} MiB; streaming {a.n} scenes")
    counts = dict(ok=0, errors=0, output_records=0, explained_tokens=0)
    t0, next_sample, done = time.perf_counter(), a.sample_every, 0
    while done < a.n:
        n = min(a.batch_size, a.n - done)
        out = stage(actor(scene_batch(a.seed, done, n, shard, a.given_response)))
        for st, rec in zip(out["status"], out["records"]):
            counts["ok" if st == "ok" else "errors"] += 1
            recs = pickle.loads(rec)
            counts["output_records"] += len(recs)
            counts["explained_tokens"] += sum(r.get("map") is not None for r in recs)
        del out
        done += n
        if done >= next_sample or done == a.n:
            el = time.perf_counter() - t0
            curve.append(dict(rows=done, rss_mb=round(rss_bytes() / 2**20, 1), seconds=round(el, 1)))
            log(f"{done}/{a.n} rows  rss {curve[-1]['rss_mb']} MiB  {done / el:.2f} rows/s")
            while next_sample <= done:
                next_sample += a.sample_every
    counts["seconds"] = time.perf_counter() - t0
    return counts, curve


def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.seed in scenes.TRAIN_SEEDS:
        ap.error(f"seed {a.seed} trained the shipped model; pick a held-out one")

    import torch

    from dcam.actors.probe_actor import ProbeActor
    from dcam.actors.score_stage import RefineScoreStage

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if a.json else (lambda m: print(m, flush=True))
    model_cfg = {"backend": "tiny", "device": a.device}
    if a.model_source:
        model_cfg["source"] = a.model_source
    probe_cfg = {"batch_size": a.batch_size, "faithfulness_steps": a.faithfulness_steps, "threads": a.threads}
    t_load = time.perf_counter()
    actor = ProbeActor(model_cfg, METHODS, probe_cfg)
    stage = RefineScoreStage(METHODS, SINK, "soakhash0001")
    load_s = time.perf_counter() - t_load

    log(f"model loaded in {load_s:.1f}s")
    counts, curve = _stream(actor, stage, a, log)
    elapsed = counts.pop("seconds")
    stats = growth_stats(curve, a.warmup)
    res = dict(n=a.n, seed=a.seed, batch_size=a.batch_size, faithfulness_steps=a.faithfulness_steps,
               model=a.model_source or "shipped tiny", response="given" if a.given_response else "generated",
               device=str(actor.backend.device), torch_threads=torch.get_num_threads(), **counts,
               model_load_s=round(load_s, 1),
               seconds=round(elapsed, 1), rows_per_s=round(a.n / elapsed, 2), rss_source=rss_source(),
               sample_every=a.sample_every, curve=curve, **stats, max_growth_allowed=a.max_growth,
               passed=stats["max_growth_after_warmup"] <= a.max_growth,
               python=platform.python_version(), torch=torch.__version__)
    if a.n <= a.warmup:
        res["note"] = f"n={a.n} <= warm-up {a.warmup}: the warm-up is the last sample, growth is not measured"
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
