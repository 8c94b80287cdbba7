"""Issue 18 item 5: an audit's output never lies inside its input (nor the input inside the output),
and a dcam run directory is never listed as input shards, on local disk and on S3."""
from __future__ import annotations

import json

import pytest

from dcam.actors import scenes
from dcam.pipeline import job
from dcam.pipeline.config import load_config
from dcam.pipeline.layout import OverlapError, check_disjoint
from dcam.pipeline.sources import SourceError, list_shards
from dcam.pipeline.storage import open_fs
from dcam.pipeline.synth import write_corpus


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(base URL, storage_options, overrides for `dcam run`)."""
    if request.param == "local":
        return str(tmp_path), {}, []
    b = request.getfixturevalue("s3_bucket")
    so = b.storage_options
    return b.url, so, [f"storage.{k}={so[k]}" for k in ("endpoint_url", "key", "secret", "region")]


@pytest.mark.parametrize("layout", ["same", "output_inside_input", "input_inside_output"])
def test_overlapping_input_and_output_are_refused_before_anything_starts(where, layout, monkeypatch, random_ckpt):
    base, so, storage = where
    write_corpus(f"{base}/d/in", 4, 1190, 4, scenes.SceneConfig(), so)
    inp, out = {"same": (f"{base}/d", f"{base}/d"), "output_inside_input": (f"{base}/d", f"{base}/d/audit"),
                "input_inside_output": (f"{base}/d/in", f"{base}/d")}[layout]

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(job, "ensure_ray", no_ray)
    with pytest.raises(OverlapError) as ei:
        job.run_job(load_config("run", [f"input={inp}", f"output={out}", f"model.source={random_ckpt}", *storage]),
                    log=lambda m: None)
    assert "\n" not in str(ei.value) and "inside" in str(ei.value)
    fs, root = open_fs(f"{base}/d", so)
    fs.invalidate_cache()
    assert not [p for p in fs.find(root) if p.endswith(("manifest.json", "_lease.json"))]  # nothing written


def test_siblings_and_glob_inputs(tmp_path):
    check_disjoint(str(tmp_path / "runs" / "default-input"), str(tmp_path / "runs" / "default"))
    check_disjoint(str(tmp_path / "data2"), str(tmp_path / "data"))  # a common name prefix is not nesting
    with pytest.raises(OverlapError):
        check_disjoint(f"{tmp_path}/data/*.parquet", f"{tmp_path}/data/out")
    with pytest.raises(OverlapError):
        check_disjoint("s3://bucket/corpus/", "s3://bucket/corpus/audits/x")
    check_disjoint("s3://bucket/corpus/", "s3://other/corpus/audits/x")


def _fake_run_dir(base: str, so: dict) -> None:
    """What a finished dcam run leaves: manifest, results, report (all Parquet/JSON)."""
    write_corpus(f"{base}/results", 2, 1191, 2, scenes.SceneConfig(), so)  # any Parquet will do
    write_corpus(f"{base}/report", 2, 1192, 2, scenes.SceneConfig(), so)
    fs, root = open_fs(base, so)
    fs.pipe_file(f"{root}/manifest.json", json.dumps({"config_hash": "x", "shards": []}).encode())
    fs.pipe_file(f"{root}/summary.json", b"{}")


def test_run_directories_are_never_listed_as_input(where):
    base, so, _ = where
    shards = write_corpus(f"{base}/d", 8, 1193, 4, scenes.SceneConfig(), so)
    _fake_run_dir(f"{base}/d/audit-1", so)  # an old audit written into the corpus (issue 18 item 5)
    _fake_run_dir(f"{base}/d/sub/audit-2", so)
    assert [s.url for s in list_shards(f"{base}/d", "auto", so)] == shards
    for inside in (f"{base}/d/audit-1", f"{base}/d/audit-1/results/", f"{base}/d/audit-1/results/shard-00000.parquet",
                   f"{base}/d/audit-1/results/*.parquet"):
        with pytest.raises(SourceError, match="inside a dcam run directory"):
            list_shards(inside, "auto", so)


def test_run_of_the_old_no_argument_layout_is_refused_before_synthesising(tmp_path, monkeypatch, random_ckpt):
    """The no-argument run used to synthesise into <output>/input; such a run directory is refused
    with a message saying what to do (and nothing is synthesised for it first)."""
    from dcam.pipeline.manifest import RunConflictError

    old = tmp_path / "dcam-runs" / "default"
    shards = write_corpus(str(old / "input"), 4, 1000, 4, scenes.SceneConfig())
    (old / "manifest.json").write_text(json.dumps(dict(version=1, config_hash="x", input=str(old / "input"), shards=[
        dict(url=shards[0], format="parquet", shard_key="k", rows=4)], total_rows=4)))
    monkeypatch.setattr(job, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(RunConflictError, match="older dcam.*delete .*dcam-runs/default"):
        job.run_job(load_config("run", [f"output={old}", f"model.source={random_ckpt}"]), log=lambda m: None)
    assert not (tmp_path / "dcam-runs" / "default-input").exists()
