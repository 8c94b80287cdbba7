"""The report's audit trail (pipeline/report/audit.py): responses the model's own or given captions,
method settings, dcam versions, the resolved config, expected vs present inputs; one faithfulness
table; maps shown beside the plain image. And `dcam synth with_response=false`."""
from __future__ import annotations

import json
import re

import pyarrow.parquet as pq

from dcam import __version__
from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.cli import main
from dcam.pipeline.config import config_hash, load_config, to_dict
from dcam.pipeline.manifest import RunDir
from dcam.pipeline.report.build import generate_report
from dcam.pipeline.run_config import store_run_config

FAST = dict(resamples=50, k=3, log=lambda m: None)


def _with_config(run: str, overrides: list[str]) -> dict:
    cfg = load_config("run", [f"output={run}", *overrides])
    store_run_config(RunDir(run, {}), to_dict(cfg), config_hash(cfg))
    return to_dict(cfg)


def test_audit_trail_of_a_run_with_its_config(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=8, error_every=4, methods=("diffusion_cam", "tam"))
    _with_config(run, ["methods.tam.preset=tam", "methods.diffusion_cam.refine.akd=true", "storage.secret=hunter22-x"])
    path, s = generate_report(run, {}, **FAST)
    a = s["audit"]
    assert a["responses"]["generated"] == 6 and a["responses"]["given"] == 0
    assert a["responses"]["verdict"] == "the model's own answers"
    rows = {m["method"]: m for m in a["methods"]}
    assert rows["diffusion_cam"]["variant"] == "grad_norm" and rows["diffusion_cam"]["contrast"] == "category_mean"
    assert rows["diffusion_cam"]["state"] == "trajectory" and rows["diffusion_cam"]["hook"] == "blocks.2"
    assert rows["diffusion_cam"]["refine_settings"] == "akd=True" and rows["tam"]["variant"] == "tam"
    assert a["inputs"] == dict(expected_rows=8, present_rows=8, expected_shards=2, result_files=2, complete=True,
                               match=True)
    assert a["report_dcam_version"] == __version__ == a["run_dcam_version"]
    html = open(path, encoding="utf-8").read()
    assert '<section id="audit">' in html and "the model&#x27;s own answers" in html and "grad_norm" in html
    assert "resolved config" in html and "hunter22-x" not in html and "hunter22-x" not in json.dumps(s)


def test_given_captions_and_missing_inputs_are_flagged(tmp_path):
    inject = {i: {"response_source": "given"} for i in range(10)}
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=10, error_every=0, inject=inject)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    man["total_rows"] = 12  # the manifest expected more input rows than the results hold
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(man))
    _, s = generate_report(run, {}, **FAST)
    assert s["audit"]["responses"]["given"] == 10 and "given captions" in s["audit"]["responses"]["verdict"]
    assert any("given captions" in w for w in s["warnings"])
    assert any("expects 12 input rows; the results hold 10" in w for w in s["warnings"])
    assert any("No config.json" in w for w in s["warnings"])  # a run without its stored config says so


def test_one_faithfulness_table_and_maps_beside_the_plain_image(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=6, error_every=0, methods=("m",))
    path, s = generate_report(run, {}, **FAST)
    html = open(path, encoding="utf-8").read()
    headers = re.findall(r"<th>deletion AUC \u2193</th><th>insertion AUC</th>", html)
    assert len(headers) == 1  # the headline's faithfulness table only; the label-free section refers to it
    label_free = html.split('<section id="label-free">')[1].split("</section>")[0]
    card = label_free.split('<div class="card">')[1]
    assert card.split('<div class="tok">')[0].count("<img") == 2  # plain image + map, side by side


def test_synth_with_response_false_writes_no_captions(tmp_path, capsys):
    assert main(["synth", f"output={tmp_path / 'a'}", "n=3", "shard_size=3", "with_response=false", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["with_response"] is False
    assert "response" not in pq.read_schema(tmp_path / "a" / "shard-00000.parquet").names
    assert main(["synth", f"output={tmp_path / 'b'}", "n=3", "shard_size=3", "--json"]) == 0
    assert "response" in pq.read_schema(tmp_path / "b" / "shard-00000.parquet").names
