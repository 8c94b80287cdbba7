"""A sampled-faithfulness run (probe.faithfulness_sample < 1; issue 17): words outside the sample
hold null AUCs, which summary.json's corpus-level estimate and the report's headline leave out
(n = the sample size), with a 95% interval."""
from __future__ import annotations

import glob

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dcam.actors.numeric import mean_interval
from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.report.build import generate_report
from dcam.pipeline.report.summary import faithfulness_table


def _unsample_every_other_row(root: str) -> pa.Table:
    """Null the AUCs of every other explained row (as a run with faithfulness_sample=0.5 writes them)."""
    tables = []
    for path in sorted(glob.glob(f"{root}/results/*.parquet")):
        t = pq.read_table(path)
        keep = np.arange(t.num_rows) % 2 == 0
        explained = np.array([m is not None for m in t["method"].to_pylist()])
        cols = {}
        for k in ("deletion_auc", "insertion_auc"):
            v = t[k].to_pylist()
            cols[k] = pa.array([x if k_ else None for x, k_ in zip(v, keep)], pa.float64())
        cols["faithfulness_sampled"] = pa.array([bool(k_) if e else None for k_, e in zip(keep, explained)], pa.bool_())
        for k, arr in cols.items():
            t = t.set_column(t.schema.get_field_index(k), k, arr)
        pq.write_table(t, path)
        tables.append(t)
    return pa.concat_tables(tables)


def test_summary_and_report_estimate_from_the_sample_only(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=12, steps=1, error_every=6, methods=("m",))
    t = _unsample_every_other_row(run)
    ok = t.filter(pc.and_(pc.equal(t["status"], "ok"), pc.is_valid(t["method"])))
    dele = np.array([x for x in ok["deletion_auc"].to_pylist() if x is not None])
    assert 0 < len(dele) < ok.num_rows
    (row,) = faithfulness_table(t)
    assert (row["words"], row["sampled"], row["deletion_auc"]["n"]) == (ok.num_rows, len(dele), len(dele))
    assert row["deletion_auc"]["mean"] == pytest.approx(dele.mean())
    half = 1.959963984540054 * dele.std(ddof=1) / np.sqrt(len(dele))
    assert (row["deletion_auc"]["lo"], row["deletion_auc"]["hi"]) == (pytest.approx(dele.mean() - half),
                                                                      pytest.approx(dele.mean() + half))
    _, s = generate_report(run, {}, out_dir=str(tmp_path / "out"), resamples=200, k=3, log=lambda m: None)
    (h,) = s["headline"]
    d = h["metrics"]["deletion_auc"]
    assert d["n"] == len(dele) and d["mean"] == pytest.approx(dele.mean())
    assert d["lo"] < d["mean"] < d["hi"]


def test_mean_interval_leaves_out_missing_values():
    assert mean_interval([None, float("nan")]) == dict(mean=None, lo=None, hi=None, n=0)
    assert mean_interval([0.5, None]) == dict(mean=0.5, lo=None, hi=None, n=1)
    d = mean_interval([0.2, 0.4, None, 0.6, float("nan")])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.4)
    assert d["hi"] - d["mean"] == pytest.approx(1.959963984540054 * 0.2 / np.sqrt(3))
