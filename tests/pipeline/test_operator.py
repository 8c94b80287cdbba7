"""What an operator sees: one clear line (exit 2, or 1 when a retry may help) for user errors instead of
a traceback, `dcam run --help`, an ETA, exit 2 for a run whose rows are mostly errors, throughput kept
when a finished run is rerun."""
from __future__ import annotations

import json

import pytest
from jobutil import FAST

from dcam.actors import scenes
from dcam.pipeline.cli import main
from dcam.pipeline.console import format_duration, progress_line
from dcam.pipeline.synth import png_bytes

NO_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
          "AWS_ENDPOINT_URL_S3")


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("args,code,text", [
    (["input={tmp}/nope"], 2, "cannot list {tmp}/nope: FileNotFoundError"),
    (["model.source={tmp}/no-ckpt"], 2, "checkpoint directory not found: {tmp}/no-ckpt"),
    (["input={tmp}/in", "format=jsonl"], 2, "no jsonl shards found"),
    (["input=s3://bucket/corpus/", "storage.endpoint_url=http://127.0.0.1:1"], 2,
     "cannot list s3://bucket/corpus/: NoCredentialsError"),
    (["input=s3://bucket/corpus/", "storage.endpoint_url=http://127.0.0.1:1", "storage.key=k-not-real",
      "storage.secret=s-not-real", "storage.retry_attempts=1"], 1, "Could not connect to the endpoint URL"),
])
def test_user_errors_are_one_line_not_a_traceback(args, code, text, tmp_path, capsys, monkeypatch):
    for k in NO_AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"")
    argv = ["run", f"output={tmp_path}/out", *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == code
    line = _one_line(capsys)
    assert line.startswith("dcam run: error: ") and text.format(tmp=tmp_path) in line, line
    assert "s-not-real" not in line and not (tmp_path / "out").exists()


def test_run_help_lists_the_main_keys_and_points_to_the_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for k in ("input=", "output=dcam-runs/default", "probe.batch_size=16", "model.source=", "report.fail_under=",
              "report.max_error_rate=0.5", "actors.num_gpus=0"):
        assert k in out, k
    assert "conf/run.yaml" in out and "exit codes:" in out


def test_progress_line_has_an_eta():
    assert progress_line(0, 100, 0, None) == "0/100 rows (0 ok)"
    assert progress_line(40, 100, 39, 2.0) == "40/100 rows (39 ok), 2.0 rows/s, ETA 30s"
    assert progress_line(100, 100, 99, 2.0) == "100/100 rows (99 ok), 2.0 rows/s"
    assert [format_duration(s) for s in (5, 125, 7620)] == ["5s", "2m05s", "2h07m"]


@pytest.mark.slow
def test_mostly_error_rows_exit_2_and_a_rerun_keeps_the_throughput(ray_local, tmp_path, random_ckpt, capsys):
    """3 of 4 images missing: the run finishes (every row accounted for) but exits 2; rerun: the
    figures of the execution that did the work stay in summary.json."""
    (tmp_path / "in").mkdir()
    good = tmp_path / "in" / "good.png"
    good.write_bytes(png_bytes(scenes.make_scene(1109, 0).image))
    rows = [dict(id=f"r{i}", image_uri=str(good if i == 0 else tmp_path / "in" / f"missing{i}.png"),
                 prompt="describe the image") for i in range(4)]
    (tmp_path / "in" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["run", f"input={tmp_path / 'in' / 'm.jsonl'}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}",
            *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "GATE FAILED (exit 2): error rate 0.750 (3 of 4 input rows are errors) > report.max_error_rate=0.5" in err
    assert "note: Ray logs an error-level line" in err  # the Ray line every run prints is explained
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert first["exit_code"] == 2 and first["gate"]["error_rate"] == 0.75 and first["rows_per_s"] > 0
    assert (tmp_path / "out" / "_SUCCESS").exists()  # results are complete; the verdict is the gate's
    assert main([*args, "report.max_error_rate=1.0"]) == 0  # not result-relevant: resumes, nothing to do
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["rows_per_s"] == first["rows_per_s"] and again["seconds"] == first["seconds"]
    assert again["throughput_from"] and again["gate"]["passed"]


def test_worker_errors_are_read_from_rays_text_and_bugs_keep_their_traceback():
    """Ray Data re-raises a worker's error on the driver as a UserCodeException holding only the remote
    traceback's text: the dcam error class is read from it (tests/pipeline/test_reliability.py runs it)."""
    from dcam.pipeline.operator_errors import operator_message

    class RayLike(Exception):
        pass

    RayLike.__module__ = "ray.exceptions"
    text = ("ray::MapWorker(MapBatches(ProbeActor)).submit()\nTraceback (most recent call last):\n  File x\n"
            "dcam.actors.probe_actor.ModelLoadError: ProbeActor could not load the model: SafetensorError: bad\n\n"
            "The above exception was the direct cause of the following exception:\nUDF failed")
    assert operator_message(RayLike(text)) == (1, "ProbeActor could not load the model: SafetensorError: bad")
    assert operator_message(RayLike("no dcam error in here")) is None
    assert operator_message(RuntimeError("a bug")) is None and operator_message(KeyError("k")) is None
