"""The one place that decides what a missing number is: NaN and None both mean "not measured"."""
from __future__ import annotations

import math

import numpy as np


def finite_or_none(v) -> float | None:
    """float(v), or None when v is None or NaN (JSON- and Parquet-null-friendly)."""
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def is_missing(v) -> bool:
    return finite_or_none(v) is None


def nanmean(values) -> float:
    """Mean over the defined (non-NaN, non-None) values; NaN when there are none, without
    numpy's empty-slice warning."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan
