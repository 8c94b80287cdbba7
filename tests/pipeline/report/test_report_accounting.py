"""Issue 18 item 1 in the report: the accounting (input rows the manifest lists vs present in the
result files) is stated, and a run that claims _SUCCESS while its files disagree fails loudly."""
from __future__ import annotations

import argparse
import json
import os

from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.report.build import generate_report, main_report


def _args(run, out):
    return argparse.Namespace(run_dir=run, baseline=None, fail_under=None, out=str(out), json=True,
                              overrides=["resamples=20", "k=2"])


def test_complete_run_states_its_accounting(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=8, error_every=4)
    _, s = generate_report(run, {}, out_dir=str(tmp_path / "out"), resamples=20, k=2, log=lambda m: None)
    assert s["accounting"] == dict(expected_inputs=8, present_inputs=8, exact=True)
    assert s["fail_under"]["passed"] and not any("ACCOUNTING" in w for w in s["warnings"])


def test_success_with_missing_rows_fails_the_report_gate(tmp_path, capsys):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=8, error_every=4)
    os.remove(os.path.join(run, "results", "shard-001.synthhash01.parquet"))  # 4 of 8 input rows gone
    code = main_report(_args(run, tmp_path / "out"))
    out, err = capsys.readouterr()
    assert code == 2 and "ACCOUNTING MISMATCH" in err and "4 of the 8 input rows" in err, err
    printed = json.loads(out)
    assert printed["accounting"] == dict(expected_inputs=8, present_inputs=4, exact=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("ACCOUNTING MISMATCH" in w for w in summary["warnings"])
    assert "ACCOUNTING MISMATCH" in (tmp_path / "out" / "report.html").read_text()  # on top of the report
