"""The "Given without looking" audit (pipeline/report/grounding.py): the per-row rule, the tallies
and their intervals against plain references, the report section and its gallery, the
grounded_rate gate, the drift, the threshold option and the run's own summary."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dcam.benchmarks.synthetic_run import write_synthetic_run
from dcam.pipeline.cli import main
from dcam.pipeline.report.build import generate_report
from dcam.pipeline.report.grounding import (
    GroundingTally,
    grounding_columns,
    highlight_spans,
    occurrence_of,
    wilson_interval,
)
from dcam.pipeline.report.summary import localisation_table

FAST = dict(resamples=50, k=4)


def _plain_rule(rel, wtype, thr):
    """[reliance, grounded] of one row, written out."""
    if wtype == "function" or rel is None or (isinstance(rel, float) and math.isnan(rel)):
        return [math.nan, math.nan]
    return [rel, 1.0 if rel >= thr else 0.0]


def test_grounding_columns_match_the_plain_rule_on_random_rows():
    rng = np.random.default_rng(0)
    n = 500
    rel = rng.uniform(-0.3, 1, n)
    rel[rng.random(n) < 0.1] = np.nan
    types = rng.choice(np.array(["colour", "shape", "function", None], dtype=object), n)
    got = grounding_columns(rel, pa.array(list(types), pa.string()), 0.05)
    want = np.array([_plain_rule(r, t, 0.05) for r, t in zip(rel, types)])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got, nan=-9), np.nan_to_num(want, nan=-9))
    assert np.isnan(got[types == "function"]).all() and not np.isnan(got[(types == None) & ~np.isnan(rel)]).any()  # noqa: E711
    # the boundary belongs to grounded
    assert grounding_columns(np.array([0.05]), ["shape"], 0.05)[0, 1] == 1.0
    with pytest.raises(ValueError, match="finite"):
        grounding_columns(rel, list(types), float("nan"))


def _wilson_reference(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        k = int(rng.integers(0, n + 1))
        lo, hi = wilson_interval(k, n)
        rlo, rhi = _wilson_reference(k, n)
        assert lo == pytest.approx(max(rlo, 0.0), abs=1e-9) and hi == pytest.approx(min(rhi, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (None, None)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.2 < hi < 0.35  # no zero-width interval at 0/n


def test_tally_matches_a_plain_group_by():
    rng = np.random.default_rng(2)
    n = 400
    words = rng.choice(["red", "blue", "square", "a"], n)
    types = np.where(words == "a", "function", np.where(np.isin(words, ["red", "blue"]), "colour", "shape"))
    methods = rng.choice(["m1", "m2"], n)
    rel = rng.uniform(-0.1, 0.5, n)
    cols = grounding_columns(rel, list(types), 0.1)
    tally = GroundingTally()
    for lo in range(0, n, 97):  # several batches
        s = slice(lo, lo + 97)
        tally.add(pa.array(methods[s]), pa.array(["none"] * len(methods[s])),
                  dict(token=pa.array(words[s]), word_type=pa.array(types[s]), category=pa.array([None] * len(words[s]), pa.string())),
                  cols[s])
    for r in tally.table("token"):
        sel = (methods == r["method"]) & (words == r["key"])
        assert r["key"] != "a"
        assert r["words"] == sel.sum()
        assert r["blind"] == (rel[sel] < 0.1).sum()
        assert r["image_reliance"] == pytest.approx(rel[sel].mean())
        assert (r["lo"], r["hi"]) == pytest.approx(wilson_interval(r["blind"], r["words"]))
    assert {r["key"] for r in tally.table("word_type")} == {"colour", "shape"}


def test_highlight_finds_the_explained_occurrence():
    text = "A green square and a green SQUARE and a blue square."
    assert highlight_spans(text, "\u2581square", 1) == (27, 33)
    assert text[slice(*highlight_spans(text, "square", 2))] == "square"
    assert highlight_spans(text, "squ", 0) is None  # whole words only
    assert highlight_spans(text, "circle", 0) is None and highlight_spans("", "a", 0) is None
    rows = [dict(token="square", token_index=i) for i in (9, 3, 9, 14)] + [dict(token="green", token_index=2)]
    assert [occurrence_of(rows, "square", i) for i in (3, 9, 14)] == [0, 1, 2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    return write_synthetic_run(str(tmp_path_factory.mktemp("grounding") / "run"), n_samples=30)


def _ok_rows(run_url: str) -> pa.Table:
    t = pa.concat_tables(pq.read_table(p) for p in sorted((__import__("pathlib").Path(run_url) / "results").glob("*.parquet")))
    return t.filter(pc.equal(t["status"], "ok"))


def test_report_figures_match_an_independent_computation(run, tmp_path):
    _, s = generate_report(run, out_dir=str(tmp_path / "r"), log=lambda m: None, **FAST)
    t = _ok_rows(run)
    assert s["grounding"]["threshold"] == 0.02
    for h in s["headline"]:
        sel = t.filter(pc.equal(t["method"], h["method"]))
        rel = np.array(sel["image_reliance"].to_pylist(), float)
        content = np.array([w != "function" for w in sel["word_type"].to_pylist()])
        g = h["metrics"]["grounded_rate"]
        assert g["n"] == content.sum()
        assert g["mean"] == pytest.approx((rel[content] >= 0.02).mean())
        assert g["lo"] <= g["mean"] <= g["hi"]
        assert h["metrics"]["image_reliance"]["mean"] == pytest.approx(rel[content].mean())
    blind = s["galleries"]["blind"]
    assert blind and [b["score"] for b in blind] == sorted(b["score"] for b in blind)
    assert min(b["score"] for b in blind) == pytest.approx(min(t["image_reliance"].to_pylist()))


def test_report_section_gallery_and_threshold_option(run, tmp_path):
    path, s = generate_report(run, out_dir=str(tmp_path / "r"), log=lambda m: None, **FAST)
    html = open(path).read()
    assert 'id="grounding"' in html and "Given without looking" in html and "Map faithfulness (label-free)" in html
    assert html.count("p(word | image blanked)") == len(s["galleries"]["blind"])
    assert html.count("<mark>") >= len(s["galleries"]["blind"])  # the word is marked in each gallery response
    table = pq.read_table(tmp_path / "r" / "summary.parquet").to_pylist()
    assert any(r["section"] == "grounding:word_type" and r["metric"] == "blind_rate" for r in table)
    _, strict = generate_report(run, out_dir=str(tmp_path / "r2"), log=lambda m: None, grounding_threshold=0.5, **FAST)
    assert strict["grounding"]["threshold"] == 0.5
    assert (strict["headline"][0]["metrics"]["grounded_rate"]["mean"]
            < s["headline"][0]["metrics"]["grounded_rate"]["mean"])


def test_the_runs_own_threshold_is_used(tmp_path):
    url = write_synthetic_run(str(tmp_path / "run"), n_samples=10)
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(config=dict(report=dict(grounding_threshold=0.3)))))
    _, s = generate_report(url, out_dir=str(tmp_path / "r"), log=lambda m: None, **FAST)
    assert s["grounding"]["threshold"] == 0.3


def test_fail_under_grounded_rate(run, tmp_path, capsys):
    args = ["report", run, "resamples=50", "k=2", "--out", str(tmp_path)]
    assert main([*args, "--fail-under", "grounded_rate=0.999"]) == 2
    assert "grounded_rate=" in capsys.readouterr().err
    assert main([*args, "--fail-under", "grounded_rate=0.1"]) == 0


def test_drift_of_grounding(run, tmp_path):
    base = tmp_path / "base"
    __import__("shutil").copytree(run, base)
    for p in (base / "results").glob("*.parquet"):  # the baseline relied on the image more
        t = pq.read_table(p)
        rel = pc.add(t["image_reliance"], 0.5)
        pq.write_table(t.set_column(t.schema.get_field_index("image_reliance"), "image_reliance", rel), p)
    _, s = generate_report(run, out_dir=str(tmp_path / "r"), baseline_url=str(base), log=lambda m: None, **FAST)
    t = _ok_rows(run)
    for r in s["drift"]["table"]:
        sel = t.filter(pc.equal(t["method"], r["method"]))
        rel = np.array(sel["image_reliance"].to_pylist(), float)
        assert r["metrics"]["image_reliance"]["delta"] == pytest.approx(-0.5)
        want = (rel >= 0.02).mean() - 1.0  # every baseline word is grounded after +0.5
        assert r["metrics"]["grounded_rate"]["delta"] == pytest.approx(want)
    _, same = generate_report(run, out_dir=str(tmp_path / "r3"), baseline_url=run, log=lambda m: None, **FAST)
    assert all(r["metrics"]["grounded_rate"]["delta"] == 0 for r in same["drift"]["table"])


def test_run_summary_table_has_grounding():
    t = pa.table(dict(shard=["s"] * 5, row_index=[0, 0, 1, 1, 2], error_kind=[None] * 4 + ["image"],
                      status=["ok"] * 4 + ["error"], method=["m"] * 4 + [None], refine=["none"] * 4 + [None],
                      word_type=["colour", "function", "shape", None, None],
                      image_reliance=[0.5, 0.9, 0.01, 0.3, None],
                      **{k: [None] * 5 for k in __import__("dcam.actors.schema", fromlist=["x"]).TABLE_SCORES}))
    (row,) = localisation_table(t, 0.02)
    assert row["grounded_rate"] == pytest.approx(2 / 3) and row["grounded_rate_n"] == 3
    assert row["image_reliance"] == pytest.approx((0.5 + 0.01 + 0.3) / 3)
