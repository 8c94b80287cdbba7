"""Deletion/insertion faithfulness against plain references (one forward per curve point)."""
import numpy as np
import pytest
import torch

from dcam.actors import scenes
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.probe.faithfulness import curve_auc, faithfulness, keep_masks
from dcam.actors.probe.targets import ProbeConfig, build_targets, obtain_response, select_positions


def _loop_keep(m: np.ndarray, k_steps: int, insertion: bool) -> np.ndarray:
    """Plain reference: rank cells by value (descending, ties by index), then per fraction."""
    vals = m.reshape(-1).tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    out = np.zeros((k_steps + 1, len(vals)), dtype=bool)
    for k in range(k_steps + 1):
        n_affected = int(round(len(vals) * k / k_steps))
        for i in range(len(vals)):
            affected = order.index(i) < n_affected
            out[k, i] = affected if insertion else not affected
    return out


@pytest.mark.parametrize("insertion", [False, True])
def test_keep_masks_match_loop_with_ties(insertion):
    rng = np.random.default_rng(3)
    maps = rng.random((5, 3, 4))
    maps[1, 0, :2] = maps[1, 2, 3]  # ties are broken by cell index
    maps[2] = 0.7  # constant map
    got = keep_masks(maps, 4, insertion)
    for i in range(len(maps)):
        np.testing.assert_array_equal(got[i], _loop_keep(maps[i], 4, insertion))


def test_curve_auc_is_the_trapezoid_mean():
    probs = np.random.default_rng(4).random((6, 9))
    ref = [sum((row[k] + row[k + 1]) / 2 for k in range(8)) / 8 for row in probs]
    np.testing.assert_allclose(curve_auc(probs), ref, rtol=1e-12)
    assert curve_auc(np.full((1, 5), 0.3))[0] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def probed():
    backend = TinyBackend.load()
    items = scenes.make_scenes(7100, 0, 3, scenes.SceneConfig(size=backend.model.config.image_size))
    batch, errors = backend.prepare([s.image for s in items], [s.prompt for s in items])
    assert not errors
    gen = obtain_response(backend, batch, seed=0)
    positions = {i: select_positions(backend, gen.ids[i], "content") for i in range(batch.size)}
    targets = build_targets(backend, gen, ProbeConfig(), positions)
    return backend, batch, targets


def _loop_probability(backend, batch, t, keep: np.ndarray) -> float:
    """One full-sequence forward (no prefix cache): blanked image tokens keep only their type
    and 2-D position embedding."""
    m = backend.model
    pixels, prompt = batch.inputs["pixel_values"][t.sample:t.sample + 1], batch.inputs["prompt_ids"][t.sample:t.sample + 1]
    with torch.no_grad():
        image = m.image_features(pixels)[0]
        image = torch.stack([image[c] if keep[c] else m.type_emb[1] + m.pos_2d[c] for c in range(len(keep))])[None]
        logits = m(None, prompt, t.canvas[None], inputs_embeds=m.embed(None, prompt, t.canvas[None], image_embeds=image))
    return float(logits[0, t.position].softmax(-1)[t.token_id])


@pytest.mark.parametrize("k_steps", [1, 4])
def test_faithfulness_matches_one_forward_per_curve_point(probed, k_steps):
    backend, batch, targets = probed
    targets = targets[:5]
    maps = np.random.default_rng(5).random((len(targets), 8, 8))  # random, not the model's maps
    rows_run = []
    forward = backend.attribution_forward

    def counting_forward(batch_, rows, *a, **kw):
        rows_run.append(len(rows))
        return forward(batch_, rows, *a, **kw)

    backend.attribution_forward = counting_forward
    try:
        dele, ins = faithfulness(backend, batch, torch.tensor([t.sample for t in targets]),
                                 torch.stack([t.canvas for t in targets]), torch.tensor([t.position for t in targets]),
                                 torch.tensor([t.token_id for t in targets]), maps, k_steps, rows_per_pass=3)
    finally:
        del backend.attribution_forward
    assert sum(rows_run) == len(targets) * 2 * k_steps  # the curves' shared end points run once
    for j, t in enumerate(targets):
        curves = [[_loop_probability(backend, batch, t, keep) for keep in _loop_keep(maps[j], k_steps, ins_)]
                  for ins_ in (False, True)]
        assert dele[j] == pytest.approx(curve_auc(np.array([curves[0]]))[0], abs=1e-5)
        assert ins[j] == pytest.approx(curve_auc(np.array([curves[1]]))[0], abs=1e-5)
    if k_steps > 1:  # with one step both curves are the same two points, so equal AUCs
        assert not np.allclose(dele, ins)


# ----------------------------------------------------------------------------- sampled faithfulness (issue 17)

PINNED = [True, True, True, True, False, True, True, False]


def _plain_pick(sample_id: str, token_index: int, seed: int, fraction: float) -> bool:
    import hashlib

    h = hashlib.blake2b(f"{sample_id}\x1f{token_index}\x1f{seed}".encode(), digest_size=8).hexdigest()
    return int(h, 16) < fraction * 2 ** 64

def test_sample_selector_is_a_fixed_function_of_id_word_and_seed():
    from dcam.actors.probe.faithfulness import in_faithfulness_sample as pick

    words = [(f"img-{i}", p) for i in range(2000) for p in (3, 7)]
    first = [pick(s, p, 0, 0.25) for s, p in words]
    assert first == [pick(s, p, 0, 0.25) for s, p in words]  # same words on rerun
    assert first[::-1] == [pick(s, p, 0, 0.25) for s, p in reversed(words)]  # order-independent (resume)
    assert abs(np.mean(first) - 0.25) < 0.02  # the fraction, approximately
    assert first != [pick(s, p, 1, 0.25) for s, p in words]  # the seed re-draws
    # nested: a word in the 10% sample is in the 25% sample
    assert all(b for a, b in zip([pick(s, p, 0, 0.10) for s, p in words], first) if a)
    assert all(pick(s, p, 0, 1.0) for s, p in words[:50])
    # pinned values (blake2b, not Python's per-process salted hash()): the same on every machine
    assert [pick(f"img-{i}", 3, 0, 0.5) for i in range(8)] == PINNED
    assert first == [_plain_pick(s, p, 0, 0.25) for s, p in words]
    with pytest.raises(ValueError):
        pick("a", 0, 0, 0.0)
    with pytest.raises(ValueError):
        pick("a", 0, 0, 1.5)
