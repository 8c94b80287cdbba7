"""eval-grounding: its statistics against plain references, and the organism's separation."""
import itertools

import numpy as np
import pytest

from dcam.evals.eval_grounding import auroc, run_eval_grounding, youden_threshold


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    pos, neg = rng.random(7).round(1), rng.random(9).round(1)  # rounded: ties count half
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    assert auroc(pos, neg) == pytest.approx(np.mean(pairs))
    assert np.isnan(auroc([], [1.0]))


def test_youden_threshold_is_the_middle_of_the_separating_range():
    assert youden_threshold(np.array([0.6, 0.9]), np.array([0.0, 0.1])) == pytest.approx(0.35)
    t = youden_threshold(np.array([0.2, 0.4, 0.9]), np.array([0.1, 0.3]))  # overlapping classes
    assert 0.1 < t < 0.4
    # one outlying positive among 200 does not pull the threshold down to the negatives
    pos = np.r_[np.linspace(0.6, 0.9, 199), 0.02]
    assert youden_threshold(pos, np.zeros(100)) == pytest.approx((0.0 + 0.6) / 2, abs=0.01)


@pytest.mark.slow
def test_organism_separates_function_from_content_words_and_controls_remove_it():
    cfg = dict(n=16, seed=3200, selection_seed=4200, model="tiny", batch_size=16, resamples=200, untrained_seed=0)
    r = run_eval_grounding(cfg)
    c = r["conditions"]
    assert c["model"]["auroc_reliance"] > 0.95 and c["model"]["separation"] > 0.5
    for control in ("blank_image", "other_image"):
        for t in ("colour", "shape"):
            assert c[control]["by_type"][t]["image_reliance"] < 0.1, (control, t)
    assert abs(c["untrained"]["separation"]) < 0.05
    assert 0.0 < r["threshold"] < 0.8


def test_command_config_is_validated_before_anything_runs():
    """The CLI path loads conf/eval_grounding.yaml through its schema (it had none: the command
    raised TypeError before running)."""
    from dcam.evals.eval_grounding import EvalGroundingConfig
    from dcam.pipeline.config import load_config
    from dcam.pipeline.config_check import ConfigError

    cfg = load_config("eval_grounding", ["n=4"], schema=EvalGroundingConfig)
    assert cfg.n == 4 and cfg.selection_seed == 4200
    with pytest.raises(ConfigError, match="n = 0"):
        load_config("eval_grounding", ["n=0"], schema=EvalGroundingConfig)
    with pytest.raises(ConfigError, match="selection_sed"):
        load_config("eval_grounding", ["selection_sed=1"], schema=EvalGroundingConfig)
