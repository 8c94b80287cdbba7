"""Streaming, bounded-memory statistics over a run's result files (the engine of `dcam report`).

One pass reads the result files batch by batch (ParquetFile.iter_batches, only the scalar columns plus
`map`; never thumbnails, prompts or raw maps) and feeds accumulators whose state does not grow
with the number of rows:

- `GroupBootstrap`: per-group means with a streaming Poisson bootstrap (every row gets B iid
  Poisson(1) weights; a replicate's mean is sum(w*x)/sum(w)). This is the standard online
  approximation of the multinomial bootstrap over rows; it is seeded and deterministic for a
  given set of files. State: groups x metrics x B.
- `Breakdowns`: count and mean per (method, refine, value) for token/category/word_type/shard/step.
- `TopK`: the k best/worst rows by a score (gallery candidates; only their keys are kept).
- `PrioritySample`: a uniform sample of at most K rows' scores, for the histograms.
- `Failures`: error rows by error_kind with a few examples.
Only the rows picked for galleries are read again, whole (`fetch_rows`).

Per-file state: the distinct ok row indices of one file (to count ok inputs); result files are one
per input shard, so this is bounded by the largest shard.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcam.actors.numeric import finite_or_none
from dcam.actors.schema import MAP_STATS, TABLE_SCORES
from dcam.pipeline.report.grounding import (
    DEFAULT_GROUNDING_THRESHOLD,
    GROUNDING_DIMS,
    GROUNDING_METRICS,
    GroundingTally,
    grounding_columns,
)
from dcam.pipeline.sinks import SCHEMA

# (headline key, source): a Parquet column, or a map statistic computed here.
ROW_METRICS = TABLE_SCORES
MAP_METRICS = MAP_STATS
BOOT_METRICS = ROW_METRICS + MAP_METRICS + GROUNDING_METRICS
BREAKDOWN_DIMS = ("token", "category", "word_type", "shard", "step")
BREAKDOWN_METRICS = ("obj_iou", "pointing", "energy", "f3", "deletion_auc", "map_top10")
KEY_COLS = ("shard", "row_index", "method", "refine", "token_index", "step")
SCAN_COLS = ["id", "shard", "row_index", "token", "token_index", "word_type", "category", "method", "refine", "step",
             "status", "error", "error_kind", "model_id", "config_hash", "response_source", "hook", "state",
             *ROW_METRICS, "image_reliance", "map"]
MAX_SETTINGS = 64  # distinct (method, refine, hook, state) combinations kept for the audit trail
BATCH_ROWS = 4096
BOOT_CHUNK = 1024
READ_BUFFER = 1 << 20


def result_files(fs, root: str) -> list[str]:
    """Final result files of a run (results/*.parquet), sorted; `_parts/`, dot files and .tmp are ignored."""
    d = f"{root.rstrip('/')}/results"
    if not fs.exists(d):
        return []
    out = []
    for info in fs.ls(d, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and name.endswith(".parquet") and not name.startswith(("_", ".")):
            out.append(info["name"])
    return sorted(out)


def iter_batches(fs, paths, columns, filter=None, batch_size: int = BATCH_ROWS):
    """Record batches of `paths` (one file or a list) with only `columns` (in SCHEMA types; a column
    missing from an older file comes back null), optionally filtered by a pyarrow expression.

    Reads with ParquetFile.iter_batches through a small buffered stream, which decodes `batch_size`
    rows at a time even inside a huge row group (the sink writes one row group per shard file), so
    memory does not grow with the file."""
    fields = [SCHEMA.field(c) for c in columns]
    for path in [paths] if isinstance(paths, str) else paths:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh, buffer_size=READ_BUFFER, pre_buffer=False)
            have = [c for c in columns if c in set(pf.schema_arrow.names)]
            for b in pf.iter_batches(batch_size=batch_size, columns=have, use_threads=False):
                n = b.num_rows
                arrays = [b.column(f.name).cast(f.type) if f.name in have else pa.nulls(n, f.type) for f in fields]
                b = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
                if filter is not None:
                    b = pa.Table.from_batches([b]).filter(filter).combine_chunks()
                    b = b.to_batches()[0] if b.num_rows else None
                if b is not None and b.num_rows:
                    yield b


def col_np(batch, name: str) -> np.ndarray:
    """A numeric column as float64 numpy (null -> NaN)."""
    return batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


_LUT = None


def poisson_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """(n, b) float32 iid Poisson(1) weights (inverse CDF on 16-bit uniforms)."""
    global _LUT
    if _LUT is None:
        cdf = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])
        _LUT = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).astype(np.float32)
    return _LUT[rng.integers(0, 65536, size=(n, b), dtype=np.uint16)]


def list_parts(col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, start offsets into values, values as float64) of a list<float> column; null -> length 0."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float64)
    return lengths, np.concatenate([[0], np.cumsum(lengths)])[:-1].astype(np.int64), values


def map_stats(col) -> tuple[np.ndarray, np.ndarray]:
    """(top-10% mass, normalised entropy) of each map in a list<float> column (NaN for null/empty/all-zero)."""
    n = len(col)
    top, ent = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return top, ent
    lengths, offsets, values = list_parts(col)
    for length in np.unique(lengths[lengths > 1]):
        idx = np.nonzero(lengths == length)[0]
        p = np.clip(values[offsets[idx][:, None] + np.arange(length)], 0, None)
        tot = p.sum(1)
        k = max(1, math.ceil(0.1 * length))
        with np.errstate(divide="ignore", invalid="ignore"):
            top[idx] = np.partition(p, length - k, axis=1)[:, length - k:].sum(1) / tot
            q = p / tot[:, None]
            ent[idx] = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(1) / math.log(length)
        bad = ~(tot > 0)
        top[idx[bad]], ent[idx[bad]] = np.nan, np.nan
    return top, ent


def f3_aggregate(obj_iou, contrast, concentration):
    """The paper's F3 (actors.scores.f3_table, vectorised over bootstrap replicates): harmonic mean of
    mean Obj-IoU, min(mean contrast / 20, 1) and mean concentration; 0 when any term is <= 0, NaN
    when any is NaN. Returns a float for scalar input."""
    from dcam.actors.scores import f3_table

    out = np.asarray(f3_table(obj_iou, contrast, concentration), np.float64)
    return out if out.ndim else float(out)


class GroupBootstrap:
    """Per-group means of several metrics with streaming Poisson-bootstrap replicates (see module doc)."""

    def __init__(self, metrics, resamples: int = 1000):
        self.metrics, self.b = tuple(metrics), int(resamples)
        self.index: dict[tuple, int] = {}
        self.s, self.n, self.rs, self.rn = [], [], [], []

    def code(self, key: tuple) -> int:
        """Stable integer code of a group key (created on first use)."""
        if key not in self.index:
            self.index[key] = len(self.index)
            m = len(self.metrics)
            self.s.append(np.zeros(m)), self.n.append(np.zeros(m, np.int64))
            self.rs.append(np.zeros((m, self.b))), self.rn.append(np.zeros((m, self.b)))
        return self.index[key]

    def add(self, codes: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        """Rows with group `codes` (n,), values `x` (n, M) (NaN = missing) and weights `w` (n, B)."""
        m = len(self.metrics)
        for g in np.unique(codes):
            sel = codes == g
            xg = x[sel]
            valid = ~np.isnan(xg)
            x0 = np.where(valid, xg, 0.0)
            self.s[g] += x0.sum(0)
            self.n[g] += valid.sum(0)
            r = w[sel].T @ np.concatenate([x0, valid], axis=1).astype(np.float32)  # (B, 2M), one GEMM
            self.rs[g] += r[:, :m].T
            self.rn[g] += r[:, m:].T

    def replicates(self, g: int) -> np.ndarray:
        """(M, B) replicate means (NaN where a replicate has no weight)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.rn[g] > 0, self.rs[g] / self.rn[g], np.nan)

    def means(self, g: int) -> np.ndarray:
        """(M,) exact means of group g over its non-missing values (NaN when none)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.n[g] > 0, self.s[g] / self.n[g], np.nan)


def interval(reps: np.ndarray) -> tuple[float | None, float | None]:
    """Percentile 95% interval of bootstrap replicates (None when there are none)."""
    reps = reps[~np.isnan(reps)]
    if not len(reps):
        return None, None
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


num = finite_or_none  # float, with NaN/None -> None (JSON-friendly)


class TopK:
    """The k rows with the largest (or smallest) score seen so far, at most one per group (e.g. one
    card per sample and word, so one sample's steps and methods do not fill a gallery); ties are
    broken by row key."""

    def __init__(self, k: int, largest: bool = True):
        self.k, self.largest, self.items = int(k), largest, []

    def offer(self, scores: np.ndarray, make_item, groups: np.ndarray | None = None) -> None:
        """`make_item(i)` -> dict (with 'key' and 'group' tuples) for batch row i, called only for
        candidates; `groups` (int64 per row) keeps one best candidate per group of the batch."""
        idx = np.nonzero(~np.isnan(scores))[0]
        if not len(idx) or self.k <= 0:
            return
        s = -scores[idx] if self.largest else scores[idx]
        if groups is not None:  # best row per group: sort by (group, score), keep first of each group
            order = np.lexsort((s, groups[idx]))
            g = groups[idx][order]
            first = order[np.concatenate([[True], g[1:] != g[:-1]])]
            idx, s = idx[first], s[first]
        if len(idx) > self.k:
            idx = idx[np.argpartition(s, self.k - 1)[: self.k]]
        for i in idx:
            self.items.append(dict(make_item(int(i)), score=float(scores[i])))
        sign = -1 if self.largest else 1
        self.items.sort(key=lambda it: (sign * it["score"], it["key"]))
        seen, kept = set(), []
        for it in self.items:
            if it.get("group") not in seen or it.get("group") is None:
                seen.add(it.get("group"))
                kept.append(it)
        self.items = kept[: self.k]


def sample_word_groups(t) -> np.ndarray:
    """int64 group id per row of a batch: (shard, row_index, token_index), i.e. one sample's word."""
    col = t.column("shard")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    shard = pc.dictionary_encode(col).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    row = t.column("row_index").to_numpy(zero_copy_only=False).astype(np.int64)
    tok = pc.fill_null(t.column("token_index"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return (shard << 44) + (row << 16) + (tok & 0xFFFF)


class PrioritySample:
    """A uniform random sample (seeded) of at most `size` rows: keep the smallest random priorities."""

    def __init__(self, size: int, width: int):
        self.size, self.p, self.x, self.g = int(size), np.zeros(0), np.zeros((0, width)), np.zeros(0, np.int64)

    def add(self, priorities: np.ndarray, x: np.ndarray, codes: np.ndarray) -> None:
        p, x, g = np.concatenate([self.p, priorities]), np.concatenate([self.x, x]), np.concatenate([self.g, codes])
        if len(p) > self.size:
            keep = np.argpartition(p, self.size - 1)[: self.size]
            p, x, g = p[keep], x[keep], g[keep]
        self.p, self.x, self.g = p, x, g


class Breakdowns:
    """Count and per-metric mean per (method, refine, value) for each breakdown dimension."""

    def __init__(self, dims=BREAKDOWN_DIMS, metrics=BREAKDOWN_METRICS):
        self.dims, self.metrics = dims, metrics
        self.acc: dict[str, dict[tuple, np.ndarray]] = {d: {} for d in dims}

    def add(self, method: pa.Array, refine: pa.Array, dims: dict, x: dict) -> None:
        """Accumulate one batch. `dims`: name -> key array; `x`: metric -> float64 numpy (NaN = missing), all of one length."""
        cols = {"method": method, "refine": refine, "_one": pa.array(np.ones(len(method)))}
        for m in self.metrics:
            cols[m] = pa.array(x[m], from_pandas=True)
        aggs = [("_one", "sum")] + [(m, "sum") for m in self.metrics] + [(m, "count") for m in self.metrics]
        for d in self.dims:
            t = pa.table(dict(cols, _key=dims[d]))
            if d == "step":
                t = t.filter(pc.is_valid(t["_key"]))
            for r in t.group_by(["method", "refine", "_key"]).aggregate(aggs).to_pylist():
                vec = [r["_one_sum"]] + [r[f"{m}_sum"] or 0.0 for m in self.metrics] + \
                      [r[f"{m}_count"] for m in self.metrics]
                k = (r["method"], r["refine"], r["_key"])
                self.acc[d][k] = self.acc[d].get(k, 0) + np.asarray(vec, np.float64)

    def table(self, dim: str) -> list[dict]:
        """Rows sorted by (method, refine, -rows): {method, refine, key, rows, <metric>, <metric>_n}."""
        out = []
        m = len(self.metrics)
        for (method, refine, key), v in self.acc[dim].items():
            row = dict(method=method, refine=refine, key=key, rows=int(v[0]))
            for j, name in enumerate(self.metrics):
                cnt = int(v[1 + m + j])
                row[name], row[f"{name}_n"] = (float(v[1 + j] / cnt) if cnt else None), cnt
            out.append(row)
        out.sort(key=lambda r: (r["method"], r["refine"], -r["rows"], str(r["key"])))
        return out


class Failures:
    """Error rows grouped by error_kind: counts and up to `examples` (id, shard, row, error) each."""

    def __init__(self, examples: int = 3):
        self.examples, self.kinds = examples, {}

    def add(self, rows: list[dict]) -> None:
        """Count error rows (dicts with id, shard, row_index, error, error_kind) and keep examples."""
        for r in rows:
            e = self.kinds.setdefault(r["error_kind"] or "error", dict(count=0, examples=[]))
            e["count"] += 1
            if len(e["examples"]) < self.examples:
                e["examples"].append(dict(id=r["id"], shard=r["shard"], row_index=r["row_index"], error=r["error"]))

    def table(self) -> list[dict]:
        """[{error_kind, count, examples}] most frequent first."""
        return [dict(error_kind=k, **v) for k, v in sorted(self.kinds.items(), key=lambda kv: (-kv[1]["count"], kv[0]))]


def fetch_rows(fs, files_by_shard: dict[str, list[str]], wanted: dict[str, set], columns) -> dict[tuple, list[dict]]:
    """Every row of the wanted samples ({shard: {row_index}}), whole, as {(shard, row_index): [row dicts]}.
    Scans only the files that hold each shard, streaming, keeping only matching rows."""
    out: dict[tuple, list[dict]] = {}
    for shard in sorted(wanted):
        files = files_by_shard.get(shard, [])
        if not files or not wanted[shard]:
            continue
        flt = (pc.field("shard") == shard) & pc.field("row_index").isin(sorted(wanted[shard]))
        for batch in iter_batches(fs, files, columns, filter=flt, batch_size=256):
            for r in batch.to_pylist():
                out.setdefault((r["shard"], r["row_index"]), []).append(r)
    return out


def row_ref(t, i: int) -> dict:
    """Identity of row i of a batch: its sort/lookup key plus a few display fields."""
    cols = ("shard", "row_index", "method", "refine", "token_index", "step", "id", "token")
    g = {c: t.column(c)[i].as_py() for c in cols}
    g["key"] = (g["shard"] or "", g["row_index"], g["method"] or "", g["refine"] or "",
                -1 if g["token_index"] is None else g["token_index"], -1 if g["step"] is None else g["step"])
    g["group"] = (g["shard"], g["row_index"], g["token_index"])
    return g


class RunScan:
    """The one streaming pass over a run (see module doc); call `scan(fs, files)`, then read the fields."""

    def __init__(self, k: int = 8, resamples: int = 1000, seed: int = 0, sample_size: int = 20000, strips: int = 3,
                 grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD):
        self.rng = np.random.default_rng(seed)
        self.grounding_threshold = float(grounding_threshold)
        self.grounding = GroundingTally()
        self.boot = GroupBootstrap(BOOT_METRICS, resamples)
        self.group_rows: dict[int, int] = {}
        self.breakdowns = Breakdowns()
        self.tops = dict(worst=TopK(k, False), best=TopK(k, True), deletion=TopK(k, True), diffuse=TopK(k, False),
                         blind=TopK(k, False))
        self.sample = PrioritySample(sample_size, len(BOOT_METRICS))
        self.failures = Failures()
        self.strips: list[tuple] = []
        self.n_strips, self.multistep = strips, False
        self.counts = dict(rows=0, ok_rows=0, error_rows=0, untargeted_rows=0, ok_inputs=0)
        self.files_by_shard: dict[str, list[str]] = {}
        self.models: set = set()
        self.hashes: set = set()
        self.responses: dict[str, int] = {}  # response_source -> ok input samples
        self.settings: set = set()  # (method, refine, hook, state) seen on explained rows

    def scan(self, fs, files: list[str]) -> "RunScan":
        """Read every result file once, batch by batch; returns self."""
        for path in files:
            ok_keys, ok_sources, shards = [], [], {}
            for batch in iter_batches(fs, path, SCAN_COLS):
                keys, sources = self._batch(batch, shards)
                ok_keys.append(keys)
                ok_sources.append(sources)
            if ok_keys:
                uniq, first = np.unique(np.concatenate(ok_keys), return_index=True)
                self.counts["ok_inputs"] += int(len(uniq))
                for src in np.concatenate(ok_sources)[first]:
                    self.responses[str(src)] = self.responses.get(str(src), 0) + 1
            for s in shards:
                self.files_by_shard.setdefault(s, []).append(path)
        return self

    def _batch(self, batch, shards: dict) -> tuple[np.ndarray, np.ndarray]:
        """Feed one record batch; returns keys (shard code, row_index) and response sources of its ok rows."""
        self.counts["rows"] += batch.num_rows
        for s in pc.unique(batch.column("shard")).to_pylist():
            shards.setdefault(s, len(shards))
        for name, bag in (("model_id", self.models), ("config_hash", self.hashes)):
            if len(bag) < 20:
                bag.update(v for v in pc.unique(batch.column(name)).to_pylist() if v is not None)
        ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        errs = batch.filter(pc.invert(ok))
        if errs.num_rows:
            self.counts["error_rows"] += errs.num_rows
            self.failures.add(errs.select(["id", "shard", "row_index", "error", "error_kind"]).to_pylist())
        okb = batch.filter(ok)
        self.counts["ok_rows"] += okb.num_rows
        targeted = okb.filter(pc.is_valid(okb.column("method")))
        self.counts["untargeted_rows"] += okb.num_rows - targeted.num_rows
        if targeted.num_rows:
            self._targeted(targeted)
        codes = np.array([shards[s] for s in okb.column("shard").to_pylist()], np.int64)
        sources = np.array([s or "unknown" for s in okb.column("response_source").to_pylist()], dtype=object)
        return (codes << 40) + okb.column("row_index").to_numpy(zero_copy_only=False).astype(np.int64), sources

    def _targeted(self, t) -> None:
        """Scores of ok rows with an explained token: bootstrap, sample, breakdowns, gallery candidates."""
        top10, ent = map_stats(t.column("map"))
        grounding = grounding_columns(col_np(t, "image_reliance"), t.column("word_type"), self.grounding_threshold)
        x = np.column_stack([col_np(t, m) for m in ROW_METRICS] + [top10, ent, grounding])
        keys = list(zip(t.column("method").to_pylist(), t.column("refine").to_pylist()))
        codes = np.array([self.boot.code(k) for k in keys], np.int64)
        for g, c in zip(*np.unique(codes, return_counts=True)):
            self.group_rows[int(g)] = self.group_rows.get(int(g), 0) + int(c)
        for lo in range(0, len(x), BOOT_CHUNK):  # weights are (rows x B): keep the block small
            sl = slice(lo, lo + BOOT_CHUNK)
            self.boot.add(codes[sl], x[sl], poisson_weights(self.rng, len(x[sl]), self.boot.b))
        self.sample.add(self.rng.random(len(x)), x, codes)
        col = {m: x[:, BOOT_METRICS.index(m)] for m in BOOT_METRICS}
        self.breakdowns.add(t.column("method"), t.column("refine"), {d: t.column(d) for d in BREAKDOWN_DIMS}, col)
        item, groups = (lambda i: row_ref(t, i)), sample_word_groups(t)
        self.tops["worst"].offer(col["obj_iou"], item, groups)
        self.tops["best"].offer(col["obj_iou"], item, groups)
        self.tops["deletion"].offer(col["deletion_auc"], item, groups)
        self.tops["diffuse"].offer(col["map_top10"], item, groups)
        self.tops["blind"].offer(col["image_reliance"], item, groups)  # content words only (NaN otherwise)
        self.grounding.add(t.column("method"), t.column("refine"), {d: t.column(d) for d in GROUNDING_DIMS}, grounding)
        self._find_strips(t)
        if len(self.settings) < MAX_SETTINGS:
            names = ("method", "refine", "hook", "state")
            combos = pa.table({c: t.column(c) for c in names}).group_by(list(names)).aggregate([])
            self.settings.update(tuple(r[c] for c in names) for r in combos.to_pylist())

    def _find_strips(self, t) -> None:
        """Note (sample, method, token) groups with several per-step maps (bounded: first few found)."""
        if self.multistep and len(self.strips) >= self.n_strips:
            return
        st = t.filter(pc.is_valid(t.column("step")))
        if not st.num_rows:
            return
        keys = ["shard", "row_index", "method", "token_index"]
        tab = pa.table({**{c: st.column(c) for c in keys}, "_one": pa.array(np.ones(st.num_rows))})
        for r in tab.group_by(keys).aggregate([("_one", "sum")]).to_pylist():
            if r["_one_sum"] >= 2:
                self.multistep = True
                k = tuple(r[c] for c in keys)
                if len(self.strips) < self.n_strips and k not in self.strips:
                    self.strips.append(k)
