"""What the pipeline's stages write per explained token, end to end without Ray (read + decode ->
ProbeActor -> RefineScoreStage -> WriteStage -> Parquet read back):
- answer grounding (issue 19): `blind_prob` and `image_reliance` on every ok row, equal to a direct
  recomputation with grounding.blind_probs; null on error rows;
- per-step rows (issue 13, defect 7): rows after the commit step are labelled `trajectory_committed`."""
import os

import numpy as np
import pyarrow.dataset as pads
import pytest

from dcam.actors import scenes
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.probe.grounding import blind_probs
from dcam.actors.probe.targets import ProbeConfig, build_targets, obtain_response, select_positions
from dcam.actors.probe_actor import ProbeActor
from dcam.actors.schema import COLUMN_NAMES
from dcam.actors.score_stage import RefineScoreStage
from dcam.pipeline.config import config_hash, load_config, to_dict
from dcam.pipeline.decode import DecodeStage
from dcam.pipeline.sinks import WriteStage
from dcam.pipeline.sources import list_shards, read_shard
from dcam.pipeline.synth import write_corpus

N, SEED, BAD = 5, 7600, 2  # row BAD gets corrupt image bytes: an error row


def _written_rows(tmp_path, overrides: list[str]):
    """Rows of a 5-scene corpus (one corrupt) through the pipeline's stages, read back from Parquet."""
    write_corpus(str(tmp_path / "input"), N, SEED, N, scenes.SceneConfig(), with_response=False)
    cfg = load_config("run", [f"input={tmp_path}/input", f"output={tmp_path}/run", "report.enabled=false",
                              "probe.faithfulness_steps=0", *overrides])
    d = to_dict(cfg)
    rows = [r for s in list_shards(str(tmp_path / "input"), "parquet") for r in read_shard(s, {}, d["source"])]
    rows[BAD]["image"] = b"this is not an image"
    decoded = DecodeStage(d)({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    out = RefineScoreStage(d["methods"], d["sink"], config_hash(cfg))(ProbeActor(d["model"], d["methods"], d["probe"])(decoded))
    shard = str(out["shard"][0])
    WriteStage(str(tmp_path / "run"), config_hash(cfg), {shard: "shard-0"})(out)
    parts = tmp_path / "run" / "_staging" / "parts"
    assert os.listdir(parts)
    return pads.dataset(str(parts), format="parquet").to_table().to_pylist()


def _recomputed_blind(state: str, per_step: bool = False) -> dict[tuple[int, int, int | None], float]:
    """(row_index, token_index, step) -> blind_prob, straight from grounding.blind_probs."""
    backend = TinyBackend.load()
    items = scenes.make_scenes(SEED, 0, N, scenes.SceneConfig())
    keep = [i for i in range(N) if i != BAD]
    batch, errors = backend.prepare([items[i].image for i in keep], [items[i].prompt for i in keep])
    assert not errors
    gen = obtain_response(backend, batch, seed=0)
    positions = {j: select_positions(backend, gen.ids[j], "content") for j in range(batch.size)}
    targets = build_targets(backend, gen, ProbeConfig(state=state, per_step=per_step), positions)
    return {(keep[t.sample], t.position, t.step): float(b) for t, b in zip(targets, blind_probs(backend, batch, targets))}


def test_blind_prob_and_image_reliance_are_written_on_every_ok_row_and_null_on_errors(tmp_path):
    assert {"blind_prob", "image_reliance", "target_prob"} <= set(COLUMN_NAMES)
    rows = _written_rows(tmp_path, [])
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in rows if r["row_index"] == BAD]
    assert len(bad) == 1 and bad[0]["status"] == "error"
    assert bad[0]["blind_prob"] is None and bad[0]["image_reliance"] is None and bad[0]["target_prob"] is None
    assert ok and all(r["blind_prob"] is not None and 0 <= r["blind_prob"] <= 1 for r in ok)
    np.testing.assert_allclose([r["image_reliance"] for r in ok], [r["target_prob"] - r["blind_prob"] for r in ok],
                               atol=1e-12)
    want = _recomputed_blind("trajectory")
    got = {(r["row_index"], r["token_index"], r["step"]): r["blind_prob"] for r in ok}
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], atol=1e-6)
    assert np.mean([r["image_reliance"] for r in ok]) > 0.5  # colour and shape words: the image decides them


def test_per_step_rows_after_the_commit_step_are_written_as_trajectory_committed(tmp_path):
    rows = [r for r in _written_rows(tmp_path, ["probe.per_step=true"]) if r["status"] == "ok"]
    one_step = {(r["row_index"], r["token_index"]) for r in rows}
    commit = {}
    for key in one_step:
        steps = sorted((r["step"], r["state"]) for r in rows if (r["row_index"], r["token_index"]) == key)
        assert [s for s, _ in steps] == list(range(len(steps)))  # every denoising step once
        labels = [state for _, state in steps]
        k = labels.count("trajectory")  # steps 0 .. commit are `trajectory`, the rest committed
        assert labels == ["trajectory"] * k + ["trajectory_committed"] * (len(steps) - k)
        commit[key] = k - 1
    assert any(c < max(r["step"] for r in rows) for c in commit.values())
    want = _recomputed_blind("trajectory", per_step=True)
    for r in rows:
        assert r["blind_prob"] == pytest.approx(want[(r["row_index"], r["token_index"], r["step"])], abs=1e-6)
