"""summary.json's counts and localisation table are accumulated one final file at a time: the
same figures as over the whole table, in memory that does not grow with the run (issue 17)."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

from dcam.actors.schema import TABLE_SCORES
from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.layout import RunDir
from dcam.pipeline.manifest import Accounting
from dcam.pipeline.report.summary import results_summary


def _summary(url: str) -> dict:
    run = RunDir(url, {})
    doc = json.loads(run.read_text("manifest.json"))
    rows = {e["url"]: e["rows"] for e in doc["shards"]}
    return results_summary(run, doc["config_hash"], {}, Accounting(expected=rows, present=dict(rows)))


def _reference(url: str) -> tuple[dict, dict]:
    """Counts and per-(method, refine) means over the whole results table at once."""
    import glob

    df = pq.read_table(sorted(glob.glob(f"{url}/results/*.parquet"))).to_pandas()
    first = df.drop_duplicates(["shard", "row_index"])
    errors = first[first.status != "ok"].error_kind.fillna("error").value_counts().to_dict()
    means = {}
    for (m, r), g in df[df.status == "ok"].groupby(["method", "refine"]):
        means[(m, r)] = {k: float(np.nanmean(g[k].astype(float))) if g[k].notna().any() else None for k in TABLE_SCORES}
    return dict(inputs=len(first), ok=int((first.status == "ok").sum()), errors=errors), means


def test_streamed_summary_equals_the_whole_table(tmp_path):
    url = write_synthetic_run(str(tmp_path / "run"), n_samples=60, n_shards=5, error_every=7)
    s = _summary(url)
    counts, means = _reference(url)
    assert {k: s[k] for k in counts} == counts
    assert {(r["method"], r["refine"]) for r in s["table"]} == set(means)
    for row in s["table"]:
        for k in TABLE_SCORES:
            want = means[(row["method"], row["refine"])][k]
            assert (row[k] is None and want is None) or row[k] == pytest.approx(want, rel=1e-12)


def test_summary_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    # Regression: the whole results table was read and every output row became a Python tuple.
    peaks = []
    for shards in (2, 16):
        url = write_synthetic_run(str(tmp_path / f"run{shards}"), n_samples=40 * shards, n_shards=shards,
                                  methods=("diffusion_cam",))
        for stray in (tmp_path / f"run{shards}" / "results").glob("*.tmp"):
            stray.unlink()  # the synthetic run plants one; the job never leaves one in results/
        tracemalloc.start()
        _summary(url)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 2.0 * peaks[0], peaks


def test_a_rerun_that_changed_nothing_reuses_the_complete_summary(tmp_path, monkeypatch):
    # Issue 17: a resumed finished 2,000-shard run on S3 read every final file twice (reconcile, then
    # the summary); the reconciliation already verified them and nothing was written since.
    from dcam.pipeline.report import summary as summary_mod

    url = write_synthetic_run(str(tmp_path / "run"), n_samples=30, n_shards=3)
    first = _summary(url)
    first["results_status"] = "complete"
    RunDir(url, {}).write_text("summary.json", json.dumps(first))
    monkeypatch.setattr(summary_mod, "iter_result_files", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    run = RunDir(url, {})
    doc = json.loads(run.read_text("manifest.json"))
    rows = {e["url"]: e["rows"] for e in doc["shards"]}
    again = results_summary(run, doc["config_hash"], {}, Accounting(expected=rows, present=dict(rows)), unchanged=True)
    assert {k: again[k] for k in ("inputs", "ok", "errors", "table")} == \
        {k: first[k] for k in ("inputs", "ok", "errors", "table")}
    with pytest.raises(AssertionError, match="read"):  # another config: the files are read again
        results_summary(run, "otherhash", {}, Accounting(expected=rows, present=dict(rows)), unchanged=True)
