"""Small synthetic run directories for the report's tests, the screenshot script and demos.

`write_synthetic_run` lays out a finished run exactly as the job does (manifest.json,
results/<shard_key>.<hash>.parquet written with `pipeline.sinks.records_table`, summary.json,
_SUCCESS) from procedural scenes (`actors.scenes`), so thumbnails and mask thumbnails are real
PNGs. Maps are Gaussian blobs near (or, for "bad" samples, away from) the named object and the
scores are computed from the map and the exact mask, so galleries look like real audits. No model
and no Ray are involved. A stray `_parts/` file and a `.tmp` file are written too: readers must
ignore both.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dcam.pipeline.sinks import records_table
from dcam.pipeline.storage import open_fs

GRID = 12
ERROR_KINDS = (("decode", "cannot identify image file"), ("fetch", "FileNotFoundError: s3://bucket/img/{i}.jpg"),
               ("bomb", "image has 90000000 pixels > max_pixels"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def blob_map(cx: float, cy: float, sharp: float, rng: np.random.Generator, grid: int = GRID) -> np.ndarray:
    """A (grid, grid) float32 map in [0, 1]: a Gaussian at (cx, cy) (grid units) plus noise."""
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sharp ** 2)) + rng.uniform(0, 0.25, (grid, grid))
    return (m / m.max()).astype(np.float32)


def map_scores(m: np.ndarray, mask: np.ndarray, oid: int) -> dict:
    """Mask-based scores of a map (simplified versions of actors' scores, for synthetic data)."""
    iy = np.arange(mask.shape[0]) * m.shape[0] // mask.shape[0]  # nearest upsampling to any image size
    ix = np.arange(mask.shape[1]) * m.shape[1] // mask.shape[1]
    up = m[np.ix_(iy, ix)]
    obj, other = mask == oid, (mask > 0) & (mask != oid)
    hot = up >= 0.5 * up.max()
    iou = float((hot & obj).sum() / max(1, (hot | obj).sum()))
    total = float(up.sum()) or 1.0
    energy = float(up[obj].sum() / total)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    ys, xs = np.nonzero(obj)
    near = float(np.min(np.hypot(ys - y, xs - x))) if len(ys) else 99.0
    conc = float(np.clip(energy * obj.size / max(1, obj.sum()) / 4, 0, 1))
    return dict(obj_iou=iou, obj_iou_bestclass=iou, precision=float((hot & obj).sum() / max(1, hot.sum())),
                recall=float((hot & obj).sum() / max(1, obj.sum())), energy=energy, concentration=conc,
                pointing=float(obj[y, x]), pointing_tol=float(near <= 8), wrong_object=float(up[other].sum() / total))


def _sample_rows(i: int, seed: int, shard: str, methods, steps: int, masks: bool, texts: dict) -> list[dict]:
    """Every output row of one synthetic sample."""
    from dcam.actors.scenes import make_scene

    sc = make_scene(seed, i)
    rng = np.random.default_rng([seed, i, 7])
    size = sc.image.shape[0]
    base = dict(id=texts.get("id", f"img-{i:05d}"), shard=shard, row_index=i, prompt=sc.prompt,
                response=texts.get("response", sc.caption), response_source=texts.get("response_source", "generated"),
                status="ok", notes="",
                model_id="tiny-dmllm", config_hash="synthhash01", probe_ms=float(rng.uniform(20, 60)),
                refine_ms=float(rng.uniform(1, 3)), hook="blocks.2", layer=2, state="trajectory")
    rows, good = [], rng.random() > 0.3
    blind_rng = np.random.default_rng([seed, i, 11])  # own stream: the other columns stay as they were
    for j, o in enumerate(sc.objects):
        x0, y0, x1, y1 = o["bbox"]
        cx, cy = (x0 + x1) / 2 / size * GRID, (y0 + y1) / 2 / size * GRID
        for w, (word, wtype) in enumerate(zip(o["words"], ("colour", "shape"))):
            for mi, method in enumerate(methods):
                for s in (range(steps) if steps > 1 else [int(rng.integers(0, 8))]):
                    jit = 0.0 if good else rng.uniform(3, 6)
                    sharp = 1.0 + mi * 0.8 + (steps - 1 - s) * 0.6 if steps > 1 else 1.0 + mi * 0.8
                    m = blob_map(cx + jit, cy + jit * 0.5, sharp, rng)
                    row = dict(base, token=texts.get("token", word), token_index=4 * j + 1 + w, word_type=wtype,
                               method=method, refine="akd+dacg+cba+sicd" if mi == 0 else "none", step=s,
                               map=m.ravel(), map_h=GRID, map_w=GRID, raw_map=m.ravel(),
                               deletion_auc=float(np.clip(rng.normal(0.3 if good else 0.6, 0.1), 0, 1)),
                               insertion_auc=float(np.clip(rng.normal(0.6 if good else 0.3, 0.1), 0, 1)),
                               target_prob=float(rng.uniform(0.3, 1)))
                    row.update(_grounding(row["target_prob"], good, blind_rng))
                    if masks:
                        sco = map_scores(m, sc.mask, o["id"])
                        con = float(rng.uniform(2, 40))
                        parts = [sco["obj_iou"], min(con / 20, 1), sco["concentration"]]
                        f3 = 0.0 if min(parts) <= 0 else 3 / sum(1 / p for p in parts)
                        row.update(sco, object_id=o["id"], category=o["category"], contrast=con,
                                   contrast_capped=min(con / 20, 1), f3=f3)
                    rows.append(row)
    rows[0].update(thumbnail=_png(sc.image), mask_thumbnail=_png(sc.mask) if masks else None)
    return rows


def _grounding(target_prob: float, good: bool, rng: np.random.Generator) -> dict:
    """blind_prob and image_reliance of a synthetic word: a well-grounded sample's words lose most of
    their probability without the image; otherwise about half are given without looking."""
    blind = target_prob * rng.uniform(0, 0.1) if good or rng.random() < 0.5 else target_prob - rng.uniform(0, 0.015)
    return dict(blind_prob=float(blind), image_reliance=float(target_prob - blind))


def _error_row(i: int, shard: str, texts: dict | None = None) -> dict:
    kind, msg = ERROR_KINDS[i % len(ERROR_KINDS)]
    texts = texts or {}
    return dict(id=texts.get("id", f"img-{i:05d}"), shard=shard, row_index=i, status="error",
                error=texts.get("error", msg.format(i=i)), error_kind=texts.get("error_kind", kind), notes="",
                config_hash="synthhash01")


def write_synthetic_run(run_url: str, n_samples: int = 12, n_shards: int = 2, methods=("diffusion_cam", "grad_cam"),
                        steps: int = 1, masks: bool = True, error_every: int = 5, seed: int = 3,
                        inject: dict | None = None, storage_options: dict | None = None) -> str:
    """Write a finished synthetic run to `run_url`; returns the URL.

    error_every=k: every k-th sample is an error row (1 = all errors, 0 = none). steps>1: each
    (sample, token, method) gets one map per denoising step. inject: {sample index: {"response":
    ..., "token": ..., "id": ..., "response_source": ...}} overrides (for escaping and audit tests)."""
    fs, root = open_fs(run_url, storage_options)
    root = root.rstrip("/")
    shards = [f"s3://corpus/shard-{k:03d}.parquet" for k in range(n_shards)]
    for k, shard in enumerate(shards):
        recs = []
        for i in range(k, n_samples, n_shards):
            if error_every and i % error_every == 0:
                recs.append(_error_row(i, shard, (inject or {}).get(i)))
            else:
                recs.extend(_sample_rows(i, seed, shard, methods, steps, masks, (inject or {}).get(i, {})))
        _put(fs, f"{root}/results/shard-{k:03d}.synthhash01.parquet", records_table(recs))
    _put(fs, f"{root}/results/_parts/shard-999.synthhash01.000000000-000000001.parquet",
         records_table([_error_row(999, "s3://corpus/stray.parquet")]))
    fs.pipe_file(f"{root}/results/shard-998.synthhash01.parquet.tmp", b"not parquet")
    manifest = dict(version=1, config_hash="synthhash01", input="s3://corpus/", created="2024-01-01T00:00:00Z",
                    shards=[dict(url=s, format="parquet", shard_key=f"shard-{k:03d}",
                                 rows=len(range(k, n_samples, n_shards))) for k, s in enumerate(shards)],
                    total_rows=n_samples)
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
    fs.pipe_file(f"{root}/_SUCCESS", b"")
    return run_url


def _put(fs, path: str, table) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
