"""Issue 18 items 5 and 7 through the real `dcam run` entry point: the no-argument layout keeps its
synthesised input beside the run and resumes; a report that fails after complete results does not
fail the audit (distinct exit status and message, results and report status apart in summary.json)."""
from __future__ import annotations

import json

import pytest
from jobutil import FAST

from dcam.pipeline.cli import main
from dcam.pipeline.report import summary as summary_mod

pytestmark = pytest.mark.slow


def test_default_layout_resumes_and_a_failed_report_keeps_the_finished_audit(ray_local, tmp_path, random_ckpt,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `dcam run` with no input or output: dcam-runs/default here
    args = ["run", "synth.n=8", "synth.shard_size=4", f"model.source={random_ckpt}", *FAST, "report.enabled=true"]

    def broken_report(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(summary_mod, "generate_report", broken_report)
    code = main(args)
    err = capsys.readouterr().err
    run, corpus = tmp_path / "dcam-runs" / "default", tmp_path / "dcam-runs" / "default-input"
    assert code == 3, err[-3000:]
    assert "REPORT FAILED: OSError: No space left on device" in err and "results are complete" in err
    assert (run / "_SUCCESS").exists() and not (run / "input").exists()
    assert sorted(p.name for p in corpus.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    s = json.loads((run / "summary.json").read_text())
    assert (s["results_status"], s["report_status"], s["exit_code"]) == ("complete", "failed", 3)
    assert "No space left" in s["report_error"] and s["accounting"]["present_inputs"] == 8

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0  # the same command again: nothing to recompute, the report is written this time
    err = capsys.readouterr().err
    assert "2 already complete, 0 to process" in err and "synthesising" not in err, err[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert (s["results_status"], s["report_status"], s["exit_code"]) == ("complete", "ok", 0)
    assert (run / "report" / "report.html").exists()


def test_report_failure_and_gate_in_summary_unit(tmp_path):
    """finish_run alone (no Ray): the gate outranks a failed report; a disabled report is recorded."""
    from dcam.benchmarks.synthetic_run import write_synthetic_run
    from dcam.pipeline.layout import RunDir

    run = RunDir(write_synthetic_run(str(tmp_path / "run"), n_samples=6), {})
    base = dict(run=run.url, inputs=6, ok=6, errors={}, table=[dict(method="m", refine="none", rows=6, obj_iou=0.1)],
                results_status="complete")
    logs = []
    d = {"report": {"enabled": True, "fail_under": "obj_iou=0.5"}, "storage": {}}
    orig = summary_mod.generate_report
    try:
        summary_mod.generate_report = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("renderer broke"))
        s = summary_mod.finish_run(run, d, dict(base), logs.append)
    finally:
        summary_mod.generate_report = orig
    assert (s["report_status"], s["exit_code"]) == ("failed", summary_mod.EXIT_GATE_FAILED)
    assert any(m.startswith("REPORT FAILED: RuntimeError: renderer broke") for m in logs)
    s = summary_mod.finish_run(run, {"report": {"enabled": False}}, dict(base), logs.append)
    assert (s["report_status"], s["exit_code"]) == ("disabled", 0)
    assert json.loads(run.read_text("summary.json"))["report_status"] == "disabled"
