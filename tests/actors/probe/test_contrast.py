"""The explained score (actors/probe/contrast.py) against plain formulas (issue 13, defect 5): the
`category_mean` contrast is z_y minus the mean of its category's other logits, and for a word with
no category the log-odds z_y - log sum_{v != y} exp z_v = log(p / (1 - p)), not the log-prob."""
import math

import numpy as np
import pytest
import torch

from dcam.actors.probe.contrast import target_scores
from dcam.actors.probe.targets import Target

CATEGORIES = {"colour": [3, 4, 5, 6], "shape": [7, 8, 9]}


class _Backend:
    """Only what target_scores asks of a backend: word categories."""

    def word_category(self, token_id):
        return next((c for c, ids in CATEGORIES.items() if token_id in ids), None)

    def category_members(self, category):
        return CATEGORIES.get(category, [])


def _plain_score(z: list[float], y: int) -> float:
    """Plain Python, float64: the category_mean contrast of one row of logits."""
    cat = _Backend().word_category(y)
    members = [m for m in CATEGORIES.get(cat, []) if m != y]
    if members:
        return z[y] - math.fsum(z[m] for m in members) / len(members)
    others = [v for i, v in enumerate(z) if i != y]
    top = max(others)
    return z[y] - (top + math.log(math.fsum(math.exp(v - top) for v in others)))


def _targets(positions, tokens):
    return [Target(k, p, y, 0, torch.zeros(1)) for k, (p, y) in enumerate(zip(positions, tokens))]


def test_category_mean_and_its_no_category_fallback_equal_the_plain_formulas():
    rng = np.random.default_rng(0)
    N, L, V = 12, 5, 300
    logits = torch.tensor(rng.normal(0, 4, size=(N, L, V)), dtype=torch.float32)
    positions = rng.integers(0, L, size=N).tolist()
    tokens = [3, 5, 8, 9, 0, 1, 2, 10, 250, 299, 6, 7]  # colour, shape and words with no category
    for k, (p, y) in enumerate(zip(positions, tokens)):
        if k % 3 == 0:
            logits[k, p, y] = 35.0  # a saturated word: p_y rounds to 1.0 in float32
    got = target_scores(_Backend(), logits, _targets(positions, tokens), "category_mean")
    assert got.dtype == torch.float64
    z = logits.double()
    want = [_plain_score(z[k, p].tolist(), y) for k, (p, y) in enumerate(zip(positions, tokens))]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


def test_the_no_category_fallback_is_the_log_odds_not_the_log_prob():
    rng = np.random.default_rng(1)
    z = torch.tensor(rng.normal(0, 2, size=(1, 1, 50)), dtype=torch.float64).float()
    y = 20  # no category
    score = float(target_scores(_Backend(), z, _targets([0], [y]), "category_mean")[0])
    p = float(z[0, 0].double().softmax(-1)[y])
    assert score == pytest.approx(math.log(p / (1 - p)), abs=1e-10)
    assert abs(score - math.log(p)) > 1e-3  # not the log-probability
    logprob = float(target_scores(_Backend(), z, _targets([0], [y]), "logprob")[0])
    assert logprob == pytest.approx(math.log(p), abs=1e-5)


def test_the_fallback_gradient_is_the_log_prob_gradient_over_one_minus_p():
    """Why the fallback gives logprob's normalised maps: same gradient direction, scale 1 / (1 - p)."""
    rng = np.random.default_rng(2)
    z = torch.tensor(rng.normal(0, 2, size=(1, 1, 40)), dtype=torch.float32, requires_grad=True)
    y = 15
    t = _targets([0], [y])
    g_odds = torch.autograd.grad(target_scores(_Backend(), z, t, "category_mean").sum(), z)[0].double()
    g_logp = torch.autograd.grad(target_scores(_Backend(), z, t, "logprob").sum(), z)[0].double()
    p = float(z[0, 0].detach().double().softmax(-1)[y])
    np.testing.assert_allclose(g_odds.numpy(), (g_logp / (1 - p)).numpy(), atol=1e-6)
