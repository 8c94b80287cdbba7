"""The "Given without looking" audit: which answer words the model would have given with no image.

Per explained row the probe writes `target_prob` (the word's probability at its attribution state),
`blind_prob` (the same with every image token blanked) and `image_reliance` = target_prob -
blind_prob (actors/probe/grounding.py, docs/METHOD.md §5.12). The audit counts only *content
words*: rows whose `word_type` is not "function" (a null word_type, as for backends that do not
type their vocabulary, counts as content; words such as "a", "and" are predictable from the text
alone by design and would only dilute the rate).

A content word is *given without looking* when image_reliance < threshold, and *grounded*
otherwise. `grounded_rate` = share of grounded content words: a headline metric (95% bootstrap
interval), a fail-under gate (`--fail-under grounded_rate=0.9`) and a drift metric. The default
threshold 0.02 was chosen by measurement (README "Given without looking"): on held-out organism
scenes, the cut that best separates colour/shape words from function words (Youden's J on a
selection set) is 0.018.

Breakdowns by word, word type and category carry Wilson 95% intervals for the blind share (a
binomial proportion, scipy's `binomtest(...).proportion_ci(method="wilson")`). They treat words
as independent draws; words of one image are not, so read the intervals as a lower bound on the
uncertainty. The headline interval is the report's row bootstrap.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import binomtest

DEFAULT_GROUNDING_THRESHOLD = 0.02
FUNCTION_WORD_TYPE = "function"
# Headline metrics of the audit: mean image_reliance of content words, share of grounded content words.
GROUNDING_METRICS = ("image_reliance", "grounded_rate")
GROUNDING_DIMS = ("token", "word_type", "category")


def content_word_mask(word_type) -> np.ndarray:
    """(n,) bool: the row explains a content word (word_type is not "function"; null counts)."""
    wt = word_type if isinstance(word_type, (pa.Array, pa.ChunkedArray)) else pa.array(list(word_type), pa.string())
    return pc.fill_null(pc.not_equal(wt, FUNCTION_WORD_TYPE), True).to_numpy(zero_copy_only=False).astype(bool)


def grounding_columns(reliance: np.ndarray, word_type, threshold: float) -> np.ndarray:
    """(n, 2) float64: [image_reliance, grounded] per row, NaN where the row is not a content word
    or has no image_reliance; grounded is 1.0 when image_reliance >= threshold, else 0.0."""
    if not np.isfinite(threshold):
        raise ValueError(f"grounding threshold must be a finite number, got {threshold!r}")
    rel = np.asarray(reliance, np.float64)
    rel = np.where(content_word_mask(word_type), rel, np.nan)
    grounded = np.where(np.isnan(rel), np.nan, (rel >= threshold).astype(np.float64))
    return np.column_stack([rel, grounded])


def wilson_interval(k: int, n: int) -> tuple[float | None, float | None]:
    """Wilson 95% interval of a proportion k/n (None, None without trials)."""
    if n <= 0:
        return None, None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


class GroundingTally:
    """Per (method, refine, value) of each dimension: content words, words given without looking,
    and the sum of image_reliance. State grows with the number of distinct values, not rows."""

    def __init__(self, dims=GROUNDING_DIMS):
        self.dims = tuple(dims)
        self.acc: dict[str, dict[tuple, np.ndarray]] = {d: {} for d in self.dims}

    def add(self, method: pa.Array, refine: pa.Array, dims: dict, cols: np.ndarray) -> None:
        """One batch: `dims` name -> key array; `cols` from grounding_columns (rows with NaN skipped)."""
        keep = ~np.isnan(cols[:, 1])
        if not keep.any():
            return
        sel = pa.array(keep)
        base = {"method": pc.filter(method, sel), "refine": pc.filter(refine, sel),
                "_n": pa.array(np.ones(int(keep.sum()))), "_blind": pa.array(1.0 - cols[keep, 1]),
                "_rel": pa.array(cols[keep, 0])}
        aggs = [("_n", "sum"), ("_blind", "sum"), ("_rel", "sum")]
        for d in self.dims:
            t = pa.table(dict(base, _key=pc.filter(dims[d], sel)))
            for r in t.group_by(["method", "refine", "_key"]).aggregate(aggs).to_pylist():
                k = (r["method"], r["refine"], r["_key"])
                v = np.array([r["_n_sum"], r["_blind_sum"], r["_rel_sum"]], np.float64)
                self.acc[d][k] = self.acc[d].get(k, 0) + v

    def table(self, dim: str) -> list[dict]:
        """Rows {method, refine, key, words, blind, blind_rate, lo, hi, image_reliance}, most words first."""
        out = []
        for (method, refine, key), (n, blind, rel) in self.acc[dim].items():
            lo, hi = wilson_interval(int(round(blind)), int(round(n)))
            out.append(dict(method=method, refine=refine, key=key, words=int(round(n)), blind=int(round(blind)),
                            blind_rate=float(blind / n), lo=lo, hi=hi, image_reliance=float(rel / n)))
        out.sort(key=lambda r: (r["method"], r["refine"], -r["words"], str(r["key"])))
        return out


def highlight_spans(response: str, token: str, occurrence: int) -> tuple[int, int] | None:
    """(start, end) of the `occurrence`-th (0-based) whole-word, case-insensitive match of the
    token's text in the response (tokenizer word-start marks stripped); None when not found."""
    import re

    word = str(token or "").replace("\u2581", " ").replace("\u0120", " ").strip()
    if not word or not response:
        return None
    hits = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", response, flags=re.IGNORECASE)]
    if not hits:
        return None
    return hits[min(max(occurrence, 0), len(hits) - 1)]


def occurrence_of(rows: list[dict], token: str, token_index: int) -> int:
    """Rank of `token_index` among the distinct canvas positions of the same token in one sample's
    rows (which occurrence of a repeated word a row explains)."""
    positions = sorted({r["token_index"] for r in rows if r.get("token") == token and r.get("token_index") is not None})
    return positions.index(token_index) if token_index in positions else 0
