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


def mean_interval(values, z: float = 1.959963984540054) -> dict:
    """{mean, lo, hi, n} of the defined values: the mean with its normal-approximation 95% interval
    mean +- z * sd / sqrt(n) (sd with n - 1; rows taken as independent). Missing values (NaN,
    None) are left out and not counted; n < 2 gives no interval, n = 0 no mean."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return dict(mean=None, lo=None, hi=None, n=0)
    mean = float(v.mean())
    if n < 2:
        return dict(mean=mean, lo=None, hi=None, n=n)
    half = z * float(v.std(ddof=1)) / math.sqrt(n)
    return dict(mean=mean, lo=mean - half, hi=mean + half, n=n)
