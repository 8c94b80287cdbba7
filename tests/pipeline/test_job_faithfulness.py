"""End-to-end: the deletion/insertion AUCs a `dcam run` writes are the curves of the row's written
`map` (issue 13, defect 1), and a sampled-faithfulness run picks its words from (id, token_index,
seed) alone, across an interruption and resume (issue 17, item 1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from jobutil import FAST, _results, _run

from dcam.actors import scenes
from dcam.actors.methods import probe_config
from dcam.actors.models import load_backend
from dcam.actors.probe.faithfulness import faithfulness, in_faithfulness_sample
from dcam.actors.probe.targets import build_targets, obtain_response
from dcam.pipeline.job import DriverInterrupted
from dcam.pipeline.synth import write_corpus

pytestmark = pytest.mark.slow

SEED, N, K = 1107, 12, 8  # corpus seed, scenes, faithfulness_steps (the default: with 2 steps only the top
# half of the cells matters, which refinement rarely changes)


def _recomputed_aucs(rows: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(id, token_index) -> (deletion, insertion) AUC recomputed here from each row's written `map`,
    with the probe's own target canvases (the corpus's given responses replayed) and nothing else
    from the run."""
    backend = load_backend({"backend": "tiny"})  # the shipped weights, as the run
    pc = probe_config("diffusion_cam", backend, {"faithfulness_steps": K})
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    out = {}
    for sid, rs in by_id.items():
        s = scenes.make_scene(SEED, int(sid.rsplit("-", 1)[1]), scenes.SceneConfig())
        batch, errors = backend.prepare([s.image], [s.prompt], [s.caption])
        assert not errors
        gen = obtain_response(backend, batch, seed=0)
        targets = {t.position: t for t in build_targets(backend, gen, pc, {0: [r["token_index"] for r in rs]})}
        sel = [targets[r["token_index"]] for r in rs]
        maps = np.stack([np.asarray(r["map"], np.float32).reshape(r["map_h"], r["map_w"]) for r in rs])
        with torch.no_grad():
            dele, ins = faithfulness(backend, batch, torch.zeros(len(sel), dtype=torch.long),
                                     torch.stack([t.canvas for t in sel]), torch.tensor([t.position for t in sel]),
                                     torch.tensor([t.token_id for t in sel]), maps, K)
        for r, d, i in zip(rs, dele, ins):
            out[(sid, r["token_index"])] = (float(d), float(i))
    return out


def test_written_aucs_are_the_curves_of_the_written_map_and_the_sample_survives_resume(ray_local, tmp_path):
    write_corpus(str(tmp_path / "in"), N, SEED, 3, scenes.SceneConfig())
    # shipped weights: a random model's word probabilities barely depend on the image (flat curves)
    base = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", *FAST,
            f"probe.faithfulness_steps={K}", "probe.faithfulness_sample=0.5", "probe.seed=3"]
    with pytest.raises(DriverInterrupted):
        _run([*base, "testing.stop_after_rows=5"])
    s = _run(base)
    assert s["ok"] == N
    rows = [r for r in _results(str(tmp_path / "out")).to_pylist() if r["status"] == "ok" and r["method"]]
    # the sample is a function of (id, token_index, seed) only: the rows of the interrupted execution and
    # of the resumed one follow the same rule
    for r in rows:
        assert r["faithfulness_sampled"] == in_faithfulness_sample(r["id"], r["token_index"], 3, 0.5)
    sampled = [r for r in rows if r["faithfulness_sampled"]]
    unsampled = [r for r in rows if not r["faithfulness_sampled"]]
    assert sampled and unsampled and len(rows) >= 20
    assert all(r["deletion_auc"] is None and r["insertion_auc"] is None for r in unsampled)
    # the refined map is not the raw map (else this test could not tell the two apart)
    assert any(not np.allclose(r["map"], r["raw_map"]) for r in sampled)
    again = _recomputed_aucs(sampled)
    for r in sampled:
        d, i = again[(r["id"], r["token_index"])]
        assert r["deletion_auc"] == pytest.approx(d, abs=1e-4) and r["insertion_auc"] == pytest.approx(i, abs=1e-4)
    fs = s["faithfulness"][0]
    assert (fs["words"], fs["sampled"], fs["deletion_auc"]["n"]) == (len(rows), len(sampled), len(sampled))
    assert fs["deletion_auc"]["mean"] == pytest.approx(np.mean([r["deletion_auc"] for r in sampled]))
    assert fs["deletion_auc"]["lo"] < fs["deletion_auc"]["mean"] < fs["deletion_auc"]["hi"]
