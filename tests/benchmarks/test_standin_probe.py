"""The stand-in probe of dcam bench-scale / bench-large emits exactly what ProbeActor emits."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from dcam.actors import scenes
from dcam.benchmarks.standin_probe import StandInProbe, stand_in_map, steady_window


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    from dcam.pipeline.config import load_config, to_dict
    from dcam.pipeline.decode import DecodeStage
    from dcam.pipeline.sources import list_shards, read_shard
    from dcam.pipeline.synth import write_corpus

    d = tmp_path_factory.mktemp("standin")
    write_corpus(str(d / "in"), 2, 5, 2, scenes.SceneConfig(), with_response=True)
    rd = to_dict(load_config("run", [f"input={d}/in", f"output={d}/run", "probe.faithfulness_steps=2"]))
    rows = [r for s in list_shards(str(d / "in"), "parquet") for r in read_shard(s, {}, rd["source"])]
    raw = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return rd, DecodeStage(rd)(raw)


def test_payload_and_columns_match_the_real_probe_actor(decoded):
    from dcam.actors.probe_actor import ProbeActor

    rd, batch = decoded
    real = ProbeActor(rd["model"], rd["methods"], rd["probe"])(dict(batch))
    fake = StandInProbe(rd["methods"], gpu_s_per_image=0.0, grid=27, words=10)(dict(batch))
    assert set(fake) == set(real)
    assert all(fake[k].dtype == real[k].dtype for k in real)
    for i in range(len(batch["id"])):
        r, f = pickle.loads(real["payload"][i]), pickle.loads(fake["payload"][i])
        assert set(f) == set(r) and set(f["maps"]) == set(r["maps"]) and set(f["methods"]) == set(r["methods"])
        rm, fm = r["maps"]["diffusion_cam"][0], f["maps"]["diffusion_cam"][0]
        assert set(fm) == set(rm)
        assert {k: type(v) for k, v in fm.items() if v is not None} == \
            {k: type(v) for k, v in rm.items() if v is not None and fm.get(k) is not None}
        assert fm["raw_map"].dtype == rm["raw_map"].dtype == np.float32
        assert fm["raw_map"].shape == (27, 27) and len(f["maps"]["diffusion_cam"]) == 10
        assert f["response_ids"] == [m["token_id"] for m in f["maps"]["diffusion_cam"]]


def test_the_real_refine_score_stage_consumes_the_stand_in_payload(decoded):
    from dcam.actors.score_stage import RefineScoreStage

    rd, batch = decoded
    out = RefineScoreStage(rd["methods"], rd["sink"], "h")(StandInProbe(rd["methods"], 0.0, grid=9, words=3)(dict(batch)))
    recs = [r for b in out["records"] for r in pickle.loads(b)]
    assert len(recs) == 2 * 3 and all(r["status"] == "ok" and r["map_h"] == r["map_w"] == 9 for r in recs)
    assert any(r["object_id"] is not None for r in recs)  # caption words name the scene's objects: scored
    assert out["refine_cpu_s"].shape == (2,) and np.all(out["refine_cpu_s"] >= 0)


def test_maps_are_deterministic_and_in_range():
    a, b, c = stand_in_map("x", 3, 27), stand_in_map("x", 3, 27), stand_in_map("x", 4, 27)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (27, 27) and a.min() >= 0 and a.max() == pytest.approx(1.0)


def test_batches_hold_the_configured_accelerator_time(decoded):
    import time

    rd, batch = decoded
    t0 = time.perf_counter()
    StandInProbe(rd["methods"], gpu_s_per_image=0.2, grid=4, words=1)(dict(batch))
    assert time.perf_counter() - t0 >= 0.4  # 2 ok images x 0.2 s


def test_steady_window_leaves_out_start_up_and_drain():
    events = [(float(t), 10) for t in range(10)]  # 100 images, one batch of 10 per second
    t_lo, t_hi, n = steady_window(events)
    assert (t_lo, t_hi, n) == (0.0, 8.0, 80)  # past 10 images at t=0, past 90 at t=8
    with pytest.raises(ValueError):
        steady_window([])
