"""Resume is blocked only by what changes results: a run interrupted at probe.batch_size=8 resumes at 4
(throughput keys are not hashed, and batching does not change the maps); a changed method is refused
before any work with the differing keys listed; the resolved config is stored in the run directory."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from jobutil import FAST, _run

from dcam.actors import scenes
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.job import DriverInterrupted
from dcam.pipeline.manifest import RunConflictError
from dcam.pipeline.synth import write_corpus


def _decoded(url: str, d: dict) -> dict:
    from dcam.pipeline.decode import DecodeStage
    from dcam.pipeline.sources import list_shards, read_shard

    rows = [r for s in list_shards(url, "parquet") for r in read_shard(s, {}, d["source"])]
    return DecodeStage(d)({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})


def test_probe_maps_do_not_depend_on_batch_size(tmp_path):
    """Why probe.batch_size may change on resume: one batch of 8 and two of 4 give the same answers and
    maps (the shipped model: its answers name objects, so there are words to explain)."""
    from dcam.actors.probe_actor import ProbeActor

    write_corpus(str(tmp_path / "in"), 8, 1108, 8, scenes.SceneConfig(), with_response=False)
    d = to_dict(load_config("run", [f"input={tmp_path / 'in'}", "probe.faithfulness_steps=2"]))
    batch = _decoded(str(tmp_path / "in"), d)
    actor = ProbeActor(d["model"], d["methods"], {**d["probe"], "threads": None})
    whole = actor(batch)["payload"]
    halves = [p for lo in (0, 4) for p in actor({k: v[lo:lo + 4] for k, v in batch.items()})["payload"]]
    compared = 0
    for a, b in zip(whole, halves):
        a, b = pickle.loads(a), pickle.loads(b)
        assert a["response"] == b["response"]
        ma, mb = a["maps"].get("diffusion_cam", []), b["maps"].get("diffusion_cam", [])
        assert [m["token"] for m in ma] == [m["token"] for m in mb]
        for x, y in zip(ma, mb):
            np.testing.assert_allclose(x["raw_map"], y["raw_map"], atol=1e-5)
            np.testing.assert_allclose([x["deletion_auc"], x["target_prob"]], [y["deletion_auc"], y["target_prob"]],
                                       atol=1e-5)
            compared += 1
    assert compared >= 16


@pytest.mark.slow
def test_resume_at_a_smaller_batch_and_a_changed_method_is_refused(ray_local, tmp_path, random_ckpt):
    write_corpus(str(tmp_path / "in"), 16, 1107, 4, scenes.SceneConfig())
    base = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={random_ckpt}", *FAST]
    with pytest.raises(DriverInterrupted):  # the first execution (probe.batch_size=8) dies part-way
        _run([*base, "testing.stop_after_rows=4"])
    # ... and resumes with smaller batches and other throughput settings (a GPU that ran out of memory)
    s = _run([*base, "probe.batch_size=4", "probe.rows_per_pass=16", "actors.num_cpus=0.25", "probe.threads=1"])
    assert s["inputs"] == 16 and s["ok"] == 16 and (tmp_path / "out" / "_SUCCESS").exists()
    stored = json.loads((tmp_path / "out" / "config.json").read_text())
    assert stored["config"]["probe"]["batch_size"] == 4 and "batch_size" not in stored["hashed"]["probe"]
    assert stored["config_hash"] == s["config_hash"] and stored["dcam_version"]
    # a result-relevant change is refused before any work, naming each differing key (run -> this command)
    with pytest.raises(RunConflictError) as e:
        _run([*base, "methods.diffusion_cam.preset=grad_cam", "probe.faithfulness_steps=3"])
    msg = str(e.value)
    assert "methods.diffusion_cam.preset: 'diffusion_cam' -> 'grad_cam'" in msg
    assert "probe.faithfulness_steps: 2 -> 3" in msg and "\n" not in msg and "batch_size" not in msg.split(".")[0]
