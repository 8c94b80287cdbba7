"""`dcam eval-faithfulness-sample`: the sampled estimate is computed from exactly the words the
pipeline's selector picks, fraction 1 is the full computation, and the command prints one JSON object."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dcam.actors.numeric import mean_interval
from dcam.actors.probe.faithfulness import in_faithfulness_sample
from dcam.evals.eval_faithfulness_sample import compare_fraction
from dcam.pipeline.cli import main


def _words(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(id=f"s{i // 4}", token_index=i % 4, deletion_auc=float(rng.random()), insertion_auc=float(rng.random()))
            for i in range(n)]


def test_fraction_one_is_the_full_computation_and_a_fraction_uses_the_selector():
    words = _words()
    full = {a: mean_interval([w[a] for w in words]) for a in ("deletion_auc", "insertion_auc")}
    one = compare_fraction(words, full, 1.0, 3)
    assert one["deletion_auc"]["seed0"] == full["deletion_auc"] and one["deletion_auc"]["max_abs_diff"] == 0
    assert one["deletion_auc"]["inside_full_interval"] == 1.0
    quarter = compare_fraction(words, full, 0.25, 2)
    picked = [w["deletion_auc"] for w in words if in_faithfulness_sample(w["id"], w["token_index"], 0, 0.25)]
    assert quarter["deletion_auc"]["seed0"]["n"] == len(picked)
    assert quarter["deletion_auc"]["seed0"]["mean"] == pytest.approx(np.mean(picked))


def test_cli_prints_one_json_object(capsys):
    argv = ["eval-faithfulness-sample", "n=2", "batch_size=2", "faithfulness_steps=1", "fractions=[1.0,0.5]",
            "sample_seeds=2", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_words"] > 0 and [r["fraction"] for r in res["fractions"]] == [1.0, 0.5]
    assert res["fractions"][0]["deletion_auc"]["seed0"] == res["full"]["deletion_auc"]
