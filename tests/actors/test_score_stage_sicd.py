"""RefineScoreStage refines with the same SICD token set as the reference and `dcam eval-cam`
(issue 13, defect 3): with `refine.sicd_tokens=parity`, the sample's raw answer canvas including
its padding, not the response ids plus one end token."""
from __future__ import annotations

import pickle

import numpy as np

from dcam.actors.refine import refine_batch
from dcam.actors.score_stage import RefineScoreStage

EOS, PAD = 2, 0


def _payload(raw: np.ndarray, response: list[int], canvas: list[int]) -> dict:
    maps = [dict(sample=0, position=p, token_id=response[p], token=f"w{p}", step=0, raw_map=m.astype(np.float32),
                 target_prob=0.5, deletion_auc=float("nan"), insertion_auc=float("nan"), word_type="colour",
                 category=None) for p, m in enumerate(raw)]
    meta = dict(hook="blocks.0.out", state="trajectory", variant="grad_norm", contrast="category_mean")
    return dict(prompt="p", response="r", response_ids=response, canvas_ids=canvas, eos_id=EOS,
                response_source="given", maps={"m": maps}, methods={"m": meta})


def _batch(payload: dict) -> dict:
    obj = lambda v: np.array([v], dtype=object)  # noqa: E731
    return dict(id=obj("s0"), shard=obj("shard"), row_index=np.array([0]), status=obj("ok"), error=obj(None),
                error_kind=obj(None), payload=obj(pickle.dumps(payload)))


def test_parity_sicd_in_the_pipeline_uses_the_raw_padded_canvas():
    rng = np.random.default_rng(5)
    raw = rng.random((3, 6, 6)) ** 2
    raw[:, 2:4, 2:4] += 1.0
    raw /= raw.max(axis=(1, 2), keepdims=True)
    response = [5, 6, 7]
    canvas = response + [EOS] + [PAD] * 8
    stage = RefineScoreStage({"m": {"preset": "diffusion_cam_parity"}})
    out = stage(_batch(_payload(raw, response, canvas)))
    written = np.stack([r["map"].reshape(6, 6) for r in pickle.loads(out["records"][0])])
    cfg = stage.refine_for("m", EOS)
    assert cfg.sicd and cfg.sicd_tokens == "parity"
    reference = refine_batch(raw, cfg, token_ids=[canvas] * 3)  # the reference: the raw canvas
    np.testing.assert_allclose(written, reference, atol=1e-7)
    assert not np.allclose(written, refine_batch(raw, cfg, token_ids=[response + [EOS]] * 3))  # the old token set
