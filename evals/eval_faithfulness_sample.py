"""`dcam eval-faithfulness-sample`: is a sampled corpus-level faithfulness estimate the full one?

On held-out scenes (eval-cam's: shipped weights, seed 3000) the default Diffusion-CAM probe runs as
`dcam run` does (generated responses, every content word explained, curves on the refined maps)
with curves for every word: the full computation, with its corpus-level deletion/insertion AUC
and 95% interval (actors.numeric.mean_interval, as summary.json). For each fraction f, the words
`probe.faithfulness_sample=f` would measure (actors.probe.faithfulness.in_faithfulness_sample) are
taken from it: a word's curves do not depend on which other words are measured, so these are the
curves a sampled run writes. Reported per fraction: the estimate and interval at sample seed 0,
and over `sample_seeds` seeds how often the estimate lies inside the full computation's 95%
interval, how often the sample's own 95% interval holds the full mean, and the largest distance
to the full mean.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List

import numpy as np

from dcam.actors import scenes
from dcam.actors.methods import probe_config, refine_config
from dcam.actors.numeric import mean_interval
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.faithfulness import in_faithfulness_sample
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log

AUCS = ("deletion_auc", "insertion_auc")


def full_curves(cfg: dict, log=print) -> list[dict]:
    """Every explained word of the held-out scenes: {id, token_index, deletion_auc, insertion_auc}."""
    from dcam.actors.models import load_backend

    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    methods = {"m": probe_config("diffusion_cam", backend, {"faithfulness_steps": int(cfg["faithfulness_steps"]),
                                                            "rows_per_pass": int(cfg["rows_per_pass"])})}
    refines = {"m": refine_config("diffusion_cam", backend.eos_id)}
    size = backend.model.config.image_size
    words, t0 = [], time.perf_counter()
    for lo in range(0, cfg["n"], cfg["batch_size"]):
        items = scenes.make_scenes(cfg["seed"], lo, min(cfg["batch_size"], cfg["n"] - lo), scenes.SceneConfig(size=size))
        ids = [f"scene-{cfg['seed']}-{lo + k:07d}" for k in range(len(items))]
        for sid, r in zip(ids, explain_batch(backend, [s.image for s in items], [s.prompt for s in items], methods,
                                             refines=refines, ids=ids)):
            if r.error is not None:
                raise RuntimeError(f"{sid}: {r.error}")
            words += [dict(id=sid, token_index=m.position, deletion_auc=m.deletion_auc, insertion_auc=m.insertion_auc)
                      for m in r.maps.get("m", [])]
        log(f"eval-faithfulness-sample: {min(lo + cfg['batch_size'], cfg['n'])}/{cfg['n']} scenes, "
            f"{len(words)} words, {time.perf_counter() - t0:.0f}s")
    return words


def compare_fraction(words: list[dict], full: dict, fraction: float, seeds: int) -> dict:
    """The sampled estimates of one fraction against the full computation `full` ({auc: interval})."""
    out = dict(fraction=fraction)
    for auc in AUCS:
        values = np.array([w[auc] for w in words])
        f = full[auc]
        inside, covers, dist, first = 0, 0, 0.0, None
        for seed in range(seeds):
            pick = np.array([in_faithfulness_sample(w["id"], w["token_index"], seed, fraction) for w in words])
            est = mean_interval(values[pick])
            first = first or est
            if est["mean"] is not None and f["lo"] <= est["mean"] <= f["hi"]:
                inside += 1
            if est["lo"] is not None and est["lo"] <= f["mean"] <= est["hi"]:
                covers += 1
            dist = max(dist, abs((est["mean"] if est["mean"] is not None else np.inf) - f["mean"]))
        out[auc] = dict(seed0=first, inside_full_interval=inside / seeds, interval_covers_full_mean=covers / seeds,
                        max_abs_diff=float(dist))
    return out


def run_eval_faithfulness_sample(cfg: dict, log=print) -> dict:
    t0 = time.perf_counter()
    words = full_curves(cfg, log)
    full = {auc: mean_interval([w[auc] for w in words]) for auc in AUCS}
    rows = [compare_fraction(words, full, float(f), int(cfg["sample_seeds"])) for f in cfg["fractions"]]
    return dict(n_scenes=cfg["n"], seed=cfg["seed"], n_words=len(words), faithfulness_steps=cfg["faithfulness_steps"],
                full=full, fractions=rows, sample_seeds=int(cfg["sample_seeds"]),
                seconds=round(time.perf_counter() - t0, 1))


def format_result(res: dict) -> str:
    f = res["full"]
    lines = [f"eval-faithfulness-sample: {res['n_words']} words on {res['n_scenes']} held-out scenes (seed {res['seed']})",
             "full: " + ", ".join(f"{a} {_ci(f[a])}" for a in AUCS)]
    for r in res["fractions"]:
        lines.append(f"fraction {r['fraction']:.2f}: " + "; ".join(
            f"{a} {_ci(r[a]['seed0'])}, inside full 95% interval in {r[a]['inside_full_interval']:.0%} of "
            f"{res['sample_seeds']} sample seeds (its interval holds the full mean in "
            f"{r[a]['interval_covers_full_mean']:.0%}), max |diff| {r[a]['max_abs_diff']:.4f}" for a in AUCS))
    return "\n".join(lines)


def _ci(d: dict) -> str:
    if d["mean"] is None:
        return "-"
    ci = "" if d["lo"] is None else f" [{d['lo']:.4f}, {d['hi']:.4f}]"
    return f"{d['mean']:.4f}{ci} n={d['n']}"


@dataclass
class EvalFaithfulnessSampleConfig:
    """conf/eval_faithfulness_sample.yaml."""
    n: int = key(ge=1)
    seed: int = key()
    model: Any = key()
    batch_size: int = key(ge=1)
    rows_per_pass: int = key(ge=1)
    faithfulness_steps: int = key(ge=1)
    fractions: List[float] = key()
    sample_seeds: int = key(ge=1)


def command(args) -> int:
    """`dcam eval-faithfulness-sample [--json] [k=v ...]`."""
    cfg = to_dict(load_config("eval_faithfulness_sample", args.overrides, schema=EvalFaithfulnessSampleConfig))
    res = run_eval_faithfulness_sample(cfg, log=log)
    emit(res, args.json, format_result(res))
    return 0
