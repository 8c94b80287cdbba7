"""Exit codes that do not lie (pipeline/report/gate.py): the error-rate gate, a gate on a partial run,
`dcam report` on a path that holds no run, fail-under metric names checked before the run starts."""
from __future__ import annotations

import json

import pytest

from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.cli import main
from dcam.pipeline.report.gate import error_rate_reasons, parse_thresholds, run_verdict

FAST = ["resamples=50", "k=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """10 samples, every 5th an error row: error rate 0.2."""
    return write_synthetic_run(str(tmp_path_factory.mktemp("gate") / "run"), n_samples=10, error_every=5)


def test_report_on_a_path_without_a_run_refuses_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["report", str(missing), *FAST]) == 2
    assert "holds no dcam run" in capsys.readouterr().err
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), *FAST, "--out", str(tmp_path / "out")]) == 2
    assert list(empty.iterdir()) == [] and not (tmp_path / "out").exists()


def test_report_baseline_without_a_run_refuses(run, tmp_path, capsys):
    assert main(["report", run, *FAST, "--baseline", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no dcam run" in capsys.readouterr().err


def test_fail_under_error_rate(run, tmp_path, capsys):
    assert main(["report", run, *FAST, "--out", str(tmp_path), "--fail-under", "error_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert "error rate 0.200 (2 of 10 input rows are errors) > fail-under error_rate=0.1" in err
    assert main(["report", run, *FAST, "--out", str(tmp_path), "--fail-under", "error_rate=0.25"]) == 0


def test_gate_on_a_partial_run_fails_unless_allowed_and_the_cli_warns(tmp_path, capsys):
    partial = write_synthetic_run(str(tmp_path / "partial"), n_samples=6, error_every=0)
    (tmp_path / "partial" / "_SUCCESS").unlink()
    assert main(["report", partial, *FAST, "--out", str(tmp_path / "a")]) == 0  # no gate: a warning only
    assert "WARNING" in capsys.readouterr().err
    code = main(["report", partial, *FAST, "--out", str(tmp_path / "b"), "--fail-under", "obj_iou=0", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "the run is partial" in err and json.loads(out)["fail_under"]["passed"] is False
    assert main(["report", partial, *FAST, "--out", str(tmp_path / "c"), "--fail-under", "obj_iou=0",
                 "--allow-partial"]) == 0


def test_unknown_fail_under_metric_is_refused_before_anything(run, tmp_path, capsys):
    assert main(["report", run, *FAST, "--out", str(tmp_path), "--fail-under", "errors=0.1"]) == 2
    assert "unknown metric" in capsys.readouterr().err and not (tmp_path / "report.html").exists()
    with pytest.raises(ValueError, match="not a number"):
        parse_thresholds("obj_iou=high")


def test_run_exits_2_when_most_rows_are_errors():
    s = dict(inputs=20, ok=2, table=[])
    v = run_verdict(s, {"max_error_rate": 0.5}, None)
    assert v["passed"] is False and v["error_rate"] == 0.9 and "report.max_error_rate=0.5" in v["reasons"][0]
    assert run_verdict(s, {"max_error_rate": 1.0}, None)["passed"]
    assert run_verdict(dict(inputs=20, ok=10, table=[]), {"max_error_rate": 0.5}, None)["passed"]  # exactly half
    assert run_verdict(s, {}, None)["passed"] is False  # the default applies when the key is absent
    assert error_rate_reasons(0, 0, 0.0, "x") == []  # an empty corpus has no error rate
    table = [dict(method="m", refine="none", obj_iou=0.2)]
    v = run_verdict(dict(inputs=10, ok=10, table=table), {"max_error_rate": 0.5, "fail_under": "obj_iou=0.3"}, None)
    assert v["reasons"] == ["m/none: obj_iou=0.2000 < 0.3"]


def test_run_with_bad_fail_under_is_refused_before_the_run(tmp_path, capsys):
    assert main(["run", f"output={tmp_path / 'out'}", "report.fail_under=obj_io=0.3"]) == 2
    assert "report.fail_under" in capsys.readouterr().err and not (tmp_path / "out").exists()
