"""`dcam report` on small synthetic run directories (no Ray, no model): sections, escaping,
fail-under exit codes, drift, error grouping, runs without masks and runs where every row failed."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.report.build import gate, generate_report, main_report
from dcam.pipeline.report.drift import Drift, map_distances
from dcam.pipeline.report.render import esc, table
from dcam.pipeline.report.scan import RunScan, f3_aggregate, map_stats, result_files
from dcam.pipeline.report.sections import card
from dcam.pipeline.report.template import SECTIONS
from dcam.pipeline.storage import open_fs

XSS = "<script>alert(1)</script>"
FAST = dict(resamples=100, k=3, log=lambda m: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """10 samples, 2 shards, 2 methods, 3 denoising steps each; corpus text with markup."""
    root = tmp_path_factory.mktemp("report")
    inject = {1: {"response": f"a red {XSS} circle", "token": XSS, "id": f"id-{XSS}"},
              5: {"error": f"cannot decode {XSS}", "id": "<img src=x onerror=alert(2)>"}}
    return write_synthetic_run(str(root / "run"), n_samples=10, steps=3, error_every=5, inject=inject)


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    path, summary = generate_report(run, {}, out_dir=str(tmp_path_factory.mktemp("out")), **FAST)
    return path, summary, open(path, encoding="utf-8").read()


def _args(run, out, **kw):
    d = dict(run_dir=run, baseline=None, fail_under=None, out=str(out), json=True, overrides=["resamples=50", "k=2"])
    d.update(kw)
    return argparse.Namespace(**d)


def test_every_section_present_and_self_contained(report):
    path, s, html = report
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    assert html.count("data:image/png;base64,") >= 10  # galleries, strips and histograms are inline
    low = html.lower()
    assert "<script" not in low and "<link" not in low and 'src="http' not in low and "url(" not in low
    assert "diffusion_cam" in html and "grad_cam" in html and "Obj-IoU" in html
    assert "step 2" in html  # per-step strip
    assert "per token" in html and "per category" in html and "per word_type" in html and "per shard" in html
    for name in ("summary.json", "summary.parquet"):
        assert (path.rsplit("/", 1)[0] + "/" + name) and open(path.rsplit("/", 1)[0] + "/" + name, "rb").read()


def test_corpus_text_is_escaped(report):
    _, _, html = report
    assert XSS not in html
    assert esc(XSS) in html  # shown as text (token, id, response, error)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert esc(XSS) in table(["h"], [[XSS]]) and XSS not in table([XSS], [[XSS]])
    from PIL import Image
    assert XSS not in card([Image.new("RGB", (4, 4))], XSS, [XSS], XSS)


def test_headline_figures_match_an_independent_computation(run, report):
    _, s, _ = report
    fs, root = open_fs(run)
    t = pq.read_table(result_files(fs, root), columns=["status", "method", "refine", "obj_iou", "contrast",
                                                     "concentration", "f3"])
    rows = {(r["method"], r["refine"]): r for r in s["headline"]}
    assert len(rows) == 2
    for (m, ref), r in rows.items():
        sel = t.filter(pa.compute.and_(pa.compute.equal(t["method"], m), pa.compute.equal(t["refine"], ref)))
        iou = np.array(sel["obj_iou"].to_pylist(), float)
        con, conc = np.array(sel["contrast"].to_pylist(), float), np.array(sel["concentration"].to_pylist(), float)
        d = r["metrics"]["obj_iou"]
        assert r["rows"] == sel.num_rows and d["n"] == len(iou)
        assert d["mean"] == pytest.approx(iou.mean(), rel=1e-12)
        assert d["lo"] < d["mean"] < d["hi"]
        assert r["metrics"]["f3"]["mean"] == pytest.approx(f3_aggregate(iou.mean(), con.mean(), conc.mean()))
        assert r["metrics"]["f3_mean"]["mean"] == pytest.approx(np.array(sel["f3"].to_pylist(), float).mean())
    assert s["inputs"] == 10 and s["ok"] == 8 and sum(s["errors"].values()) == 2


def test_galleries_show_each_sample_word_once(report):
    _, s, _ = report
    for name, items in s["galleries"].items():
        groups = [(it["shard"], it["row_index"], it["token_index"]) for it in items]
        assert len(items) == 3 and len(set(groups)) == len(groups), name  # 3 steps x 2 methods per word collapse
    worst, best = s["galleries"]["worst"], s["galleries"]["best"]
    assert [it["score"] for it in worst] == sorted(it["score"] for it in worst)
    assert [it["score"] for it in best] == sorted((it["score"] for it in best), reverse=True)
    assert best[0]["score"] >= worst[-1]["score"]


def test_bootstrap_is_seeded_and_deterministic(run):
    fs, root = open_fs(run)
    files = result_files(fs, root)
    a, b, c = (RunScan(resamples=64, seed=sd).scan(fs, files) for sd in (1, 1, 2))
    assert np.array_equal(a.boot.replicates(0), b.boot.replicates(0), equal_nan=True)
    assert not np.array_equal(a.boot.replicates(0), c.boot.replicates(0), equal_nan=True)


def test_parts_and_tmp_files_are_ignored(run, report):
    fs, root = open_fs(run)
    names = [p.rsplit("/", 1)[-1] for p in result_files(fs, root)]
    assert names == ["shard-000.synthhash01.parquet", "shard-001.synthhash01.parquet"]
    _, s, _ = report
    assert all("999" not in str(e["id"]) for f in s["failures"] for e in f["examples"])


def test_fail_under_missed_exits_2_with_the_reason(run, tmp_path, capsys):
    from dcam.pipeline.cli import main  # the real `dcam report` entry point

    code = main(["report", run, "resamples=50", "k=2", "--fail-under", "obj_iou=0.99,deletion_auc=0.01",
                 "--out", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    doc = json.loads(out)  # exactly one JSON object on stdout
    assert doc["fail_under"]["passed"] is False and doc["headline"]
    line = [ln for ln in err.splitlines() if ln.startswith("FAIL-UNDER")]
    assert len(line) == 1 and "obj_iou" in line[0] and "deletion_auc" in line[0] and "< 0.99" in line[0]


def test_fail_under_passing_exits_0(run, tmp_path, capsys):
    code = main_report(_args(run, tmp_path, fail_under="obj_iou=0.0,deletion_auc=1.0,f3=0", json=False))
    out, err = capsys.readouterr()
    assert code == 0 and "FAIL-UNDER" not in err and "report:" in out
    assert json.loads((tmp_path / "summary.json").read_text())["fail_under"]["passed"] is True


def test_fail_under_unknown_metric_is_refused(run, tmp_path, capsys):
    assert main_report(_args(run, tmp_path, fail_under="obj_io=0.3")) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_drift_against_itself_is_exactly_zero(run, tmp_path):
    path, s, = generate_report(run, {}, out_dir=str(tmp_path), baseline_url=run, **FAST)
    d = s["drift"]
    assert d["counts"]["pairs"] == s["explained_rows"] > 0
    checked = 0
    for row in d["table"]:
        for m, v in row["metrics"].items():
            if v["n"]:
                assert v["delta"] == 0.0 and v["lo"] == 0.0 and v["hi"] == 0.0, (row["method"], m, v)
                checked += 1
    assert checked >= 2 * 12
    html = open(path, encoding="utf-8").read()
    assert "Maps that moved most" in html and "paired rows" in html


def test_drift_detects_moved_maps(run, tmp_path):
    other = write_synthetic_run(str(tmp_path / "other"), n_samples=10, steps=3, error_every=5, seed=4)
    fa, ra = open_fs(run)
    fb, rb = open_fs(other)
    scan = RunScan(resamples=20).scan(fa, result_files(fa, ra))
    base = RunScan(resamples=20).scan(fb, result_files(fb, rb))
    drift = Drift(k=3, resamples=50).run(fa, scan.files_by_shard, fb, base.files_by_shard)
    assert drift.counts["pairs"] > 0
    cos = [r["metrics"]["map_cos"]["delta"] for r in drift.table()]
    assert all(c > 0.01 for c in cos) and len(drift.moved.items) == 3
    assert drift.moved.items[0]["score"] >= drift.moved.items[-1]["score"] > 0


def test_f3_is_the_papers_aggregation():
    iou, con, conc = np.array([0.3, 0.3, 0.0, 0.3, 1.0, np.nan]), np.array([10, 45, 10, -4, 20, 3.0]), np.full(6, 0.5)
    got = f3_aggregate(iou, con, conc)
    want = [3 / (1 / 0.3 + 2 + 2), 3 / (1 / 0.3 + 1 + 2), 0.0, 0.0, 3 / (1 + 1 + 2)]
    assert np.allclose(got[:5], want) and np.isnan(got[5])
    assert f3_aggregate(0.3, 10, 0.5) == pytest.approx(want[0])


def test_map_statistics_and_distances():
    flat, peak = np.ones(144, np.float32), np.zeros(144, np.float32)
    peak[7] = 1.0
    col = pa.array([flat, peak, None, np.zeros(144, np.float32)], type=pa.list_(pa.float32()))
    top, ent = map_stats(col)
    assert top[0] == pytest.approx(15 / 144) and ent[0] == pytest.approx(1.0)
    assert top[1] == pytest.approx(1.0) and ent[1] == pytest.approx(0.0)
    assert math.isnan(top[2]) and math.isnan(top[3])
    l1, cos = map_distances(col, pa.array([flat, flat, flat, None], type=pa.list_(pa.float32())))
    assert l1[0] == 0.0 and cos[0] == 0.0 and cos[1] == pytest.approx(1 - 1 / 12) and np.isnan(cos[2:]).all()


def test_no_masks(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=6, masks=False, error_every=0, methods=("m",))
    path, s = generate_report(run, {}, **FAST)
    assert path == f"{tmp_path}/run/report/report.html"  # default out: <run>/report
    (row,) = s["headline"]
    assert row["metrics"]["obj_iou"]["mean"] is None and row["metrics"]["obj_iou"]["n"] == 0
    assert row["metrics"]["f3"]["mean"] is None
    assert row["metrics"]["deletion_auc"]["n"] == row["rows"] and row["metrics"]["map_top10"]["mean"] > 0.1
    assert any("No masks" in w for w in s["warnings"])
    html = open(path, encoding="utf-8").read()
    assert "No Obj-IoU in this run" in html and "Highest deletion AUC" in html
    assert s["galleries"]["deletion"] and not s["galleries"]["worst"]
    assert any("not measured" in r for r in gate(s, {"obj_iou": 0.1})["reasons"])
    assert gate(s, {"deletion_auc": 1.0})["passed"]


def test_every_row_an_error(tmp_path):
    run = write_synthetic_run(str(tmp_path / "run"), n_samples=8, error_every=1)
    path, s = generate_report(run, {}, **FAST)
    assert s["headline"] == [] and s["ok"] == 0 and s["inputs"] == 8
    kinds = {f["error_kind"]: f for f in s["failures"]}
    assert {k: f["count"] for k, f in kinds.items()} == {"decode": 3, "fetch": 3, "bomb": 2}
    assert all(len(f["examples"]) == min(3, f["count"]) for f in kinds.values())
    html = open(path, encoding="utf-8").read()
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in html
    assert "cannot identify image file" in html and "Every input row failed" in html
    assert gate(s, {"obj_iou": 0.1})["passed"] is False
    t = pq.read_table(path.rsplit("/", 1)[0] + "/summary.parquet")
    assert set(t["section"].to_pylist()) == {"failures"}


def test_report_on_s3(s3_bucket):
    url = f"{s3_bucket.url}/runs/r1"
    write_synthetic_run(url, n_samples=4, error_every=0, methods=("m",), storage_options=s3_bucket.storage_options)
    path, s = generate_report(url, s3_bucket.storage_options, **FAST)
    assert path == f"{url}/report/report.html" and s["ok"] == 4
    fs, root = open_fs(url, s3_bucket.storage_options)
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/report/report.html").startswith(b"<!DOCTYPE html>")
    assert s3_bucket.storage_options["secret"] not in fs.cat_file(f"{root}/report/summary.json").decode()
