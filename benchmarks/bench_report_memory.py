#!/usr/bin/env python
"""Peak memory of `dcam report` on a large synthetic run (not run in CI).

    python -m dcam.benchmarks.bench_report_memory [--rows 200000] [--resamples 1000] [--json] [--keep DIR]

Writes a synthetic results directory in a temp dir, laid out as the job writes it (one zstd
Parquet file per input shard, one row group per file as pq.write_table does by default, the full
output schema): 10 output rows per sample (5 words x 2 methods), 144-float `map` and `raw_map`
per row, a 128 px PNG thumbnail (~30 KB) and mask thumbnail on the first row of each sample, 2%
error samples (generated in a subprocess). Then runs build_report in a fresh subprocess and reports
that process's peak RSS (VmHWM from /proc/self/status; resource.getrusage ru_maxrss elsewhere, which
on Linux can inherit the parent's high-water mark across fork+exec), next to the peak RSS of a
process that only imports the report's modules (the fixed cost). --json prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcam.actors.schema import FLOAT_SCORES
from dcam.pipeline.sinks import SCHEMA

ROWS_PER_SAMPLE = 10
SAMPLES_PER_SHARD = 2000
CHILD = """
import json, resource, sys, time
t0 = time.time()
from dcam.pipeline.report.build import build_report
if sys.argv[1] != "--import-only":
    build_report(sys.argv[1], {}, out_dir=sys.argv[2], log=lambda m: None, resamples=int(sys.argv[3]))
try:  # VmHWM: peak RSS of this exec'd image (ru_maxrss can carry the parent's high-water mark over fork)
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
except (OSError, IndexError):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(seconds=time.time() - t0, peak_kb=hwm)))
"""


def thumbnails(n: int = 256) -> tuple[list[bytes], list[bytes]]:
    """n distinct 128 px scene PNGs and their mask PNGs."""
    from PIL import Image

    from dcam.actors.scenes import make_scene

    out, masks = [], []
    for i in range(n):
        sc = make_scene(11, i)
        for arr, dst in ((sc.image, out), (sc.mask, masks)):
            buf = io.BytesIO()
            Image.fromarray(arr).resize((128, 128), Image.NEAREST).save(buf, format="PNG")
            dst.append(buf.getvalue())
    return out, masks


def _list(values: np.ndarray, present: np.ndarray) -> pa.Array:
    """list<float32> column: rows with present=True get their 144 values, others null."""
    n, width = values.shape
    lengths = np.where(present, width, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[present].ravel()),
                                    mask=pa.array(~present))


def _first_rows(pngs: list[bytes], row_index: np.ndarray, keep: np.ndarray) -> pa.Array:
    """Binary column: a PNG on each sample's first ok row, null elsewhere."""
    return pa.array([pngs[i % len(pngs)] if k else None for i, k in zip(row_index, keep)], pa.binary())


def shard_table(k: int, samples: int, rng: np.random.Generator, thumbs, masks) -> pa.Table:
    """All output rows of one synthetic shard, in SCHEMA (every 50th sample is an error row)."""
    err = (np.arange(samples) % 50) == 49
    reps = np.where(err, 1, ROWS_PER_SAMPLE)
    row_index = np.repeat(np.arange(samples), reps)
    n = len(row_index)
    first = np.concatenate([[True], row_index[1:] != row_index[:-1]])
    ok = ~np.repeat(err, reps)
    within = np.arange(n) - np.repeat(np.cumsum(reps) - reps, reps)
    shard = f"s3://bench-corpus/shard-{k:05d}.parquet"
    words = np.array(["red", "circle", "blue", "square", "green"])
    cols = {f.name: pa.nulls(n, f.type) for f in SCHEMA}
    cols.update(id=pa.array([f"sample-{k:05d}-{i:06d}" for i in row_index]), shard=pa.array([shard] * n),
                row_index=pa.array(row_index.astype(np.int64)), status=pa.array(np.where(ok, "ok", "error")),
                prompt=pa.array(["describe the image"] * n), notes=pa.array([""] * n),
                response=pa.array(np.where(ok, "a red circle and a blue square and a green cross", None)),
                token=pa.array(np.where(ok, words[within % 5], None)),
                token_index=pa.array(np.where(ok, within % 5, 0).astype(np.int32), mask=~ok),
                method=pa.array(np.where(ok, np.where(within < 5, "diffusion_cam", "grad_cam"), None)),
                refine=pa.array(np.where(ok, np.where(within < 5, "akd+dacg+cba+sicd", "none"), None)),
                step=pa.array(rng.integers(0, 8, n).astype(np.int32), mask=~ok),
                word_type=pa.array(np.where(ok, np.where(within % 2 == 0, "colour", "shape"), None)),
                object_id=pa.array((within % 3 + 1).astype(np.int32), mask=~ok),
                category=pa.array(np.where(ok, "circle", None)),
                map=_list(rng.random((n, 144), dtype=np.float32), ok),
                raw_map=_list(rng.random((n, 144), dtype=np.float32), ok),
                map_h=pa.array(np.full(n, 12, np.int32), mask=~ok), map_w=pa.array(np.full(n, 12, np.int32), mask=~ok),
                error=pa.array(np.where(ok, None, "cannot identify image file")),
                error_kind=pa.array(np.where(ok, None, "decode")), model_id=pa.array(["tiny-dmllm"] * n),
                config_hash=pa.array(["benchhash001"] * n), probe_ms=pa.array(rng.uniform(10, 50, n)),
                thumbnail=_first_rows(thumbs, row_index, first & ok),
                mask_thumbnail=_first_rows(masks, row_index, first & ok))
    for s in FLOAT_SCORES:
        cols[s] = pa.array(rng.random(n) * (40 if s == "contrast" else 1), mask=~ok)
    return pa.table([cols[f.name] for f in SCHEMA], schema=SCHEMA)


def write_run(root: str, rows: int, seed: int = 0) -> dict:
    """The synthetic run; returns {rows, samples, files, bytes}."""
    rng = np.random.default_rng(seed)
    thumbs, masks = thumbnails()
    os.makedirs(f"{root}/results", exist_ok=True)
    samples_total = samples = round(rows / (ROWS_PER_SAMPLE * 0.98 + 0.02))  # 2% error samples: 1 row each
    total, files, k = 0, 0, 0
    while samples_total > 0:
        n = min(SAMPLES_PER_SHARD, samples_total)
        t = shard_table(k, n, rng, thumbs, masks)
        pq.write_table(t, f"{root}/results/shard-{k:05d}.benchhash001.parquet", compression="zstd",
                       use_dictionary=[c for c in SCHEMA.names if c not in ("thumbnail", "mask_thumbnail")])
        total, files, k, samples_total = total + t.num_rows, files + 1, k + 1, samples_total - n
    open(f"{root}/_SUCCESS", "w").close()
    size = sum(os.path.getsize(f"{root}/results/{f}") for f in os.listdir(f"{root}/results"))
    return dict(rows=total, samples=samples, files=files, results_mb=round(size / 2**20, 1))


def child(*args: str) -> dict:
    """Run CHILD in a fresh interpreter; returns its JSON line plus its peak RSS (MiB)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=root,
                       env=dict(os.environ, PYTHONPATH=root))
    if p.returncode:
        raise SystemExit(f"report subprocess failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["peak_rss_mb"] = round(out["peak_kb"] / 1024, 1)
    return out


def main(argv=None) -> int:
    """Generate the run (subprocess), measure an import-only process and the report process."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--keep", help="write the run here and keep it (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.generate_only:
        print(json.dumps(write_run(a.keep, a.rows)))
        return 0
    with tempfile.TemporaryDirectory(prefix="dcam-bench-report-") as tmp:
        root = a.keep or f"{tmp}/run"
        t0 = time.time()
        gen = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate-only", "--rows", str(a.rows),
                              "--keep", root], capture_output=True, text=True, check=True)
        info = json.loads(gen.stdout)
        info["generate_s"] = round(time.time() - t0, 1)
        base = child("--import-only")
        rep = child(root, f"{tmp}/out", str(a.resamples))
        html = os.path.getsize(f"{tmp}/out/report.html")
    res = dict(info, resamples=a.resamples, peak_rss_mb=rep["peak_rss_mb"], import_rss_mb=base["peak_rss_mb"],
               report_s=round(rep["seconds"], 1), html_mb=round(html / 2**20, 2),
               map_column_mb=round(info["rows"] * 144 * 4 / 2**20, 1))
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
