"""Attribution rows (actors/probe/targets.py): the state label of per-step rows (issue 13, defect 7)."""
import pytest
import torch

from dcam.actors import scenes
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.targets import COMMITTED_LABEL, ProbeConfig, build_targets, obtain_response, select_positions


@pytest.fixture(scope="module")
def answered():
    backend = TinyBackend.load()
    items = scenes.make_scenes(7400, 0, 3, scenes.SceneConfig(size=backend.model.config.image_size))
    batch, errors = backend.prepare([s.image for s in items], [s.prompt for s in items])
    assert not errors
    gen = obtain_response(backend, batch, seed=0)
    positions = {i: select_positions(backend, gen.ids[i], "content") for i in range(batch.size)}
    return backend, items, gen, positions


def test_per_step_rows_after_the_commit_step_are_labelled_committed(answered):
    backend, _, gen, positions = answered
    targets = build_targets(backend, gen, ProbeConfig(state="trajectory", per_step=True), positions)
    assert len(targets) == sum(len(p) for p in positions.values()) * gen.n_steps
    labels = set()
    for t in targets:
        commit = int(gen.commit_step[t.sample, t.position])
        shows_token = int(t.canvas[t.position]) == t.token_id
        assert shows_token == (t.step > commit)  # the canvas holds the token exactly after its commit step
        assert t.state == (COMMITTED_LABEL if t.step > commit else "trajectory")
        labels.add(t.state)
    assert labels == {"trajectory", COMMITTED_LABEL}


@pytest.mark.parametrize("state", ["trajectory", "remask_target", "teacher_forced", "last_step"])
def test_rows_without_per_step_keep_the_methods_state(answered, state):
    backend, _, gen, positions = answered
    targets = build_targets(backend, gen, ProbeConfig(state=state), positions)
    assert targets and {t.state for t in targets} == {state}
    if state == "trajectory":
        assert all(int(t.canvas[t.position]) == backend.mask_id for t in targets)


def test_explained_maps_carry_the_row_state(answered):
    backend, items, gen, _ = answered
    cfg = {"m": ProbeConfig(hook="blocks.0.out", per_step=True, faithfulness_steps=0)}
    res = explain_batch(backend, [s.image for s in items[:1]], [s.prompt for s in items[:1]], cfg)
    maps = res[0].maps["m"]
    assert maps
    for m in maps:
        commit = int(gen.commit_step[0, m.position])
        assert m.state == (COMMITTED_LABEL if m.step > commit else "trajectory"), (m.step, commit)
    assert torch.tensor([m.state == COMMITTED_LABEL for m in maps]).any()
