"""eval-cam on a small held-out sample: the shipped model's maps localise, an untrained model's
fall to chance (the sanity check of Adebayo et al.: a method whose maps survive weight
randomisation explains the layout, not the model)."""
import pytest

from dcam.evals.eval_cam import run_eval_cam

CFG = dict(n=24, seed=3100, batch_size=24, rows_per_pass=128, faithfulness_steps=0, faithfulness_rows=[],
           untrained_seed=0, variants=[], hooks=[], model="tiny")


@pytest.fixture(scope="module")
def table():
    result = run_eval_cam(CFG, log=lambda m: None)
    return {r["name"]: r for r in result["rows"]}


def test_untrained_model_falls_to_chance(table):
    untrained, random, centre = table["untrained_model"], table["random"], table["centre"]
    assert untrained["n"] >= 40  # enough explained words for the comparison to mean something
    assert untrained["pointing_tol"] <= max(random["pointing_tol"], centre["pointing_tol"]) + 0.10, untrained
    assert untrained["energy"] <= max(random["energy"], centre["energy"]) + 0.05, untrained


def test_shipped_model_default_localises_far_above_chance(table):
    d, centre, untrained = table["diffusion_cam"], table["centre"], table["untrained_model"]
    assert d["pointing_tol"] >= 2 * max(centre["pointing_tol"], untrained["pointing_tol"]), (d, centre)
    assert d["energy"] >= 2 * centre["energy"], (d, centre)
    assert d["wrong_object"] <= 0.10, d
