"""Drift between two audits of the same corpus: paired per-row deltas and the maps that moved most.

Rows pair on (shard, row_index, method, token_index, step) (a null step pairs with a null step).
The join runs one input shard at a time (result files are one per shard), so memory is bounded by
the largest shard's scalar columns and maps, never by the run. Per (method, refine) of this run,
each metric's delta is the mean of (this - baseline) over rows where both runs have the metric,
with a streaming Poisson bootstrap over the paired rows (same seed, same weights for both runs, so
a run compared with itself gives exactly zero everywhere). F3 (the paper's aggregation) is
recomputed per replicate on each side. Map movement per pair: mean |a - b| (L1) and 1 - cosine.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dcam.pipeline.report.grounding import DEFAULT_GROUNDING_THRESHOLD, GROUNDING_METRICS, grounding_columns
from dcam.pipeline.report.scan import (
    BOOT_CHUNK,
    ROW_METRICS,
    GroupBootstrap,
    TopK,
    f3_aggregate,
    interval,
    iter_batches,
    list_parts,
    num,
    poisson_weights,
    sample_word_groups,
)

PAIR_KEY = ("shard", "row_index", "method", "token_index", "step")
F3_PARTS = ("obj_iou", "contrast", "concentration")
PAIRED_METRICS = ROW_METRICS + GROUNDING_METRICS  # per-row values differenced between the runs
DRIFT_METRICS = PAIRED_METRICS + ("map_l1", "map_cos")
DRIFT_COLS = ["shard", "row_index", "method", "refine", "token_index", "step", "id", "token", "status", "word_type",
              *ROW_METRICS, "image_reliance", "map", "map_h", "map_w"]


def shard_table(fs, files: list[str], shard: str) -> pa.Table:
    """The ok, targeted rows of one shard (DRIFT_COLS) from the files that hold it."""
    flt = (pc.field("shard") == shard) & (pc.field("status") == "ok") & pc.field("method").is_valid()
    batches = list(iter_batches(fs, files, DRIFT_COLS, filter=flt))
    if not batches:
        return pa.table({c: [] for c in DRIFT_COLS})
    return pa.Table.from_batches(batches)


def pair_rows(a: pa.Table, b: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of rows of `a` and `b` with equal PAIR_KEY, sorted by ia (deterministic)."""
    def keyed(t, name):
        """PAIR_KEY columns (null step -> -1, nulls never join) plus a row-number column."""
        cols = {k: t.column(k) for k in PAIR_KEY}
        cols["step"] = pc.fill_null(cols["step"], -1)
        cols[name] = pa.array(np.arange(t.num_rows, dtype=np.int64))
        return pa.table(cols)

    j = keyed(a, "_a").join(keyed(b, "_b"), list(PAIR_KEY), join_type="inner")
    ia, ib = j.column("_a").to_numpy(), j.column("_b").to_numpy()
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order]


def map_distances(ca, cb) -> tuple[np.ndarray, np.ndarray]:
    """(L1 = mean |a-b|, 1 - cosine) between paired maps (two list<float> columns of equal length);
    NaN where a map is missing or the shapes differ. Identical maps give exactly 0."""
    (la, oa, va), (lb, ob, vb) = list_parts(ca), list_parts(cb)
    l1, cos = np.full(len(la), np.nan), np.full(len(la), np.nan)
    same = (la == lb) & (la > 0)
    for length in np.unique(la[same]):
        idx = np.nonzero(same & (la == length))[0]
        a = va[oa[idx][:, None] + np.arange(length)]
        b = vb[ob[idx][:, None] + np.arange(length)]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where((na > 0) & (nb > 0), 1.0 - (a * b).sum(1) / (na * nb), 1.0)
        eq = (a == b).all(1)
        l1[idx] = np.where(eq, 0.0, np.abs(a - b).mean(1))
        cos[idx] = np.where(eq, 0.0, c)
    return l1, cos


class Drift:
    """Accumulates paired deltas shard by shard; `table()` and `moved` give the results."""

    def __init__(self, k: int = 8, resamples: int = 1000, seed: int = 0,
                 grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD):
        self.rng = np.random.default_rng(seed + 1)
        self.grounding_threshold = float(grounding_threshold)
        self.delta = GroupBootstrap(DRIFT_METRICS, resamples)
        self.this, self.base = GroupBootstrap(F3_PARTS, resamples), GroupBootstrap(F3_PARTS, resamples)
        self.moved = TopK(k, largest=True)
        self.counts = dict(pairs=0, this_rows=0, base_rows=0, shards_paired=0, shards_this_only=0, shards_base_only=0)

    def run(self, this_fs, this_files: dict, base_fs, base_files: dict) -> "Drift":
        """Pair every shard present in both runs ({shard: [files]} maps); returns self."""
        shared = sorted(set(this_files) & set(base_files), key=str)
        self.counts.update(shards_paired=len(shared), shards_this_only=len(set(this_files) - set(base_files)),
                           shards_base_only=len(set(base_files) - set(this_files)))
        for shard in shared:
            self.add_shard(shard_table(this_fs, this_files[shard], shard),
                           shard_table(base_fs, base_files[shard], shard))
        return self

    def add_shard(self, a: pa.Table, b: pa.Table) -> None:
        """Pair one shard's rows and feed the accumulators."""
        self.counts["this_rows"] += a.num_rows
        self.counts["base_rows"] += b.num_rows
        ia, ib = pair_rows(a, b)
        if not len(ia):
            return
        self.counts["pairs"] += len(ia)
        a, b = a.take(pa.array(ia)), b.take(pa.array(ib))
        xa, xb = self._paired_values(a), self._paired_values(b)
        both = ~np.isnan(xa) & ~np.isnan(xb)
        xa, xb = np.where(both, xa, np.nan), np.where(both, xb, np.nan)
        l1, cos = map_distances(a.column("map"), b.column("map"))
        keys = zip(a.column("method").to_pylist(), a.column("refine").to_pylist())
        codes = np.array([self.delta.code(k) for k in keys])
        for key in self.delta.index:
            self.this.code(key), self.base.code(key)
        parts = [ROW_METRICS.index(p) for p in F3_PARTS]
        for lo in range(0, len(codes), BOOT_CHUNK):
            s = slice(lo, lo + BOOT_CHUNK)
            w = poisson_weights(self.rng, len(codes[s]), self.delta.b)
            self.delta.add(codes[s], np.column_stack([xa[s] - xb[s], l1[s], cos[s]]), w)
            self.this.add(codes[s], xa[s][:, parts], w)
            self.base.add(codes[s], xb[s][:, parts], w)
        self.moved.offer(cos, lambda i: _moved_item(a, b, i, l1[i]), sample_word_groups(a))

    def _paired_values(self, t: pa.Table) -> np.ndarray:
        """(n, len(PAIRED_METRICS)) float64: the row scores, then image_reliance and grounded of content words."""
        x = [t.column(m).to_numpy(zero_copy_only=False).astype(np.float64) for m in ROW_METRICS]
        rel = t.column("image_reliance").to_numpy(zero_copy_only=False).astype(np.float64)
        return np.column_stack([*x, grounding_columns(rel, t.column("word_type"), self.grounding_threshold)])

    def table(self) -> list[dict]:
        """Per (method, refine): pairs and {metric: {delta, lo, hi, n}} including f3 and map_l1/map_cos."""
        out = []
        for key, g in sorted(self.delta.index.items()):
            means, reps = self.delta.means(g), self.delta.replicates(g)
            metrics = {}
            for j, m in enumerate(DRIFT_METRICS):
                lo, hi = interval(reps[j])
                metrics["f3_mean" if m == "f3" else m] = dict(delta=num(means[j]), lo=lo, hi=hi,
                                                              n=int(self.delta.n[g][j]))
            f3a, f3b = f3_aggregate(*self.this.means(g)), f3_aggregate(*self.base.means(g))
            lo, hi = interval(f3_aggregate(*self.this.replicates(g)) - f3_aggregate(*self.base.replicates(g)))
            metrics["f3"] = dict(delta=num(f3a - f3b), lo=lo, hi=hi, n=int(min(self.this.n[g])))
            out.append(dict(method=key[0], refine=key[1], pairs=int(self.delta.n[g].max()), metrics=metrics))
        return out


def _moved_item(a: pa.Table, b: pa.Table, i: int, l1: float) -> dict:
    """Gallery item of a pair: identity, both maps and both runs' Obj-IoU."""
    g = {c: a.column(c)[i].as_py() for c in ("shard", "row_index", "method", "refine", "token_index", "step", "id",
                                             "token", "map_h", "map_w")}
    g["key"] = (g["shard"], g["row_index"], g["method"], g["refine"],
                -1 if g["token_index"] is None else g["token_index"], -1 if g["step"] is None else g["step"])
    g["group"] = (g["shard"], g["row_index"], g["token_index"])
    g.update(map=a.column("map")[i].as_py(), base_map=b.column("map")[i].as_py(),
             base_h=b.column("map_h")[i].as_py(), base_w=b.column("map_w")[i].as_py(), l1=float(l1),
             obj_iou=a.column("obj_iou")[i].as_py(), base_obj_iou=b.column("obj_iou")[i].as_py())
    return g
