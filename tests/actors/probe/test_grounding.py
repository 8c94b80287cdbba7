"""Answer grounding (blind_prob, image_reliance) against a plain reference, and its meaning on the
model organism: function words blind-predictable, colour/shape words image-reliant."""
import dataclasses

import numpy as np
import pytest
import torch
from tiny_reference import loop_probability

from dcam.actors import scenes
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.probe.contrast import target_probs
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.grounding import blank_image_keep, blind_probs, image_reliance
from dcam.actors.probe.targets import ProbeConfig, build_targets, obtain_response, select_positions


@pytest.fixture(scope="module")
def answered():
    backend = TinyBackend.load()
    items = scenes.make_scenes(7300, 0, 6, scenes.SceneConfig(size=backend.model.config.image_size))
    batch, errors = backend.prepare([s.image for s in items], [s.prompt for s in items])
    assert not errors
    gen = obtain_response(backend, batch, seed=0)
    positions = {i: select_positions(backend, gen.ids[i], "all") for i in range(batch.size)}
    return backend, batch, build_targets(backend, gen, ProbeConfig(state="trajectory"), positions)


def test_blind_probs_match_one_full_forward_per_word(answered):
    backend, batch, targets = answered
    got = blind_probs(backend, batch, targets, rows_per_pass=5)  # several chunks
    cells = batch.spans[0].rows * batch.spans[0].cols
    want = [loop_probability(backend, batch, t, np.zeros(cells, bool)) for t in targets]
    np.testing.assert_allclose(got, want, atol=1e-6)
    with_image = [loop_probability(backend, batch, t, np.ones(cells, bool)) for t in targets]
    assert not np.allclose(got, with_image, atol=1e-3)  # blanking changes the answer's probabilities


def test_blind_probs_group_rows_by_grid_size(answered):
    backend, batch, targets = answered
    calls = []
    forward = backend.attribution_forward

    def recording(batch_, rows, canvas, hooks, image_keep=None):
        calls.append(tuple(image_keep.shape))
        return forward(batch_, rows, canvas, hooks, image_keep=image_keep)

    spans = list(batch.spans)
    batch.spans[0] = dataclasses.replace(spans[0], rows=4, cols=16)  # same cell count: one group
    backend.attribution_forward = recording
    try:
        blind_probs(backend, batch, targets, rows_per_pass=1000)
    finally:
        del backend.attribution_forward
        batch.spans[:] = spans
    assert calls == [(len(targets), 64)]
    with pytest.raises(ValueError, match="one grid size"):
        other = dataclasses.replace(spans[1], rows=2, cols=2)
        batch.spans[1] = other
        try:
            blank_image_keep(backend, batch, [0, 1])
        finally:
            batch.spans[:] = spans


def test_image_reliance_is_the_probability_difference():
    np.testing.assert_allclose(image_reliance([0.9, 0.2, np.nan], [0.1, 0.2, 0.5]), [0.8, 0.0, np.nan])


def test_function_words_are_blind_predictable_and_content_words_image_reliant(answered):
    backend, batch, targets = answered
    rows = torch.tensor([t.sample for t in targets])
    with torch.no_grad():
        p = target_probs(backend.attribution_forward(batch, rows, torch.stack([t.canvas for t in targets]), []).logits,
                         targets).double().numpy()
    rel = image_reliance(p, blind_probs(backend, batch, targets))
    types = np.array([backend.word_type(t.token_id) for t in targets])
    assert set(types) >= {"function", "colour", "shape"}
    assert rel[types == "function"].max() < 0.05
    assert rel[np.isin(types, ["colour", "shape"])].mean() > 0.5


def test_explain_batch_writes_blind_prob_and_image_reliance_on_every_row(answered):
    """Every explained row of every method (not only rows sampled for curves) carries the pair, equal
    to a direct recomputation with blind_probs in that row's state; faithfulness off or on."""
    backend, batch, _ = answered
    items = scenes.make_scenes(7300, 0, 6, scenes.SceneConfig(size=backend.model.config.image_size))
    methods = {"traj": ProbeConfig(hook="blocks.0.out", faithfulness_steps=0),
               "remask": ProbeConfig(hook="blocks.0.out", state="remask_target", faithfulness_steps=2, rows_per_pass=3)}
    timings = {}
    res = explain_batch(backend, [s.image for s in items], [s.prompt for s in items], methods, timings=timings)
    assert timings["grounding"] > 0
    gen = obtain_response(backend, batch, seed=0)
    positions = {i: select_positions(backend, gen.ids[i], "content") for i in range(batch.size)}
    for name, cfg in methods.items():
        targets = build_targets(backend, gen, cfg, positions)
        want = blind_probs(backend, batch, targets)
        maps = [m for r in res for m in r.maps[name]]
        assert len(maps) == len(targets) > 0
        got = np.array([m.blind_prob for m in maps])
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose([m.image_reliance for m in maps], [m.target_prob - m.blind_prob for m in maps],
                                   atol=1e-12)
    assert {backend.word_type(m.token_id) for r in res for m in r.maps["traj"]} >= {"colour", "shape"}
    assert np.mean([m.image_reliance for r in res for m in r.maps["traj"]]) > 0.5  # content words need the image
