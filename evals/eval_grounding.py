"""`dcam eval-grounding`: does `image_reliance` say which words were given without looking?

On fresh held-out scenes the model organism answers; every answer word is explained in its
trajectory state (the canvas just before it was committed), and its probability with the image
(`target_prob`) is compared with its probability with every image token blanked (`blind_prob`).
What must come out (METHOD.md §5.12):

- function words ("a", "and") are blind-predictable (reliance near 0) and colour and shape words
  image-reliant: the separation is reported as the AUROC of image_reliance, content vs function;
- controls: with the image replaced by a blank one, or by another scene's image, and the same
  answer replayed through the model's own schedule, colour and shape words lose their reliance;
- the untrained model (same architecture, random weights) shows no separation.

The "given without looking" threshold (`report.grounding_threshold`) is chosen here, on the
selection seed only: the value that best separates function from content words (Youden's J).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from dcam.actors import scenes
from dcam.actors.probe.contrast import target_probs
from dcam.actors.probe.grounding import blind_probs, image_reliance
from dcam.actors.probe.targets import ProbeConfig, build_targets, obtain_response, select_positions
from dcam.evals.eval_cam import _untrained_backend
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, format_table, log

CONTENT, FUNCTION = ("colour", "shape"), ("function",)
CONDITIONS = ("model", "blank_image", "other_image", "untrained")
SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # thresholds at which the shares given without looking are reported


def auroc(positive, negative) -> float:
    """P(a random positive scores above a random negative), ties counted half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def bootstrap_ci(values, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    lo, hi = np.percentile(v[idx].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def youden_threshold(positive, negative, tolerance: float = 0.01) -> float:
    """The reliance threshold t for `positive >= t` by Youden's J = TPR - FPR: the middle of the
    range of cuts whose J is within `tolerance` of the best. With well separated classes a whole
    range separates them; its middle is farthest from both, where the single best cut would sit
    just above the negatives and move with one outlying positive."""
    values = np.unique(np.concatenate([positive, negative]))
    cuts = (values[1:] + values[:-1]) / 2 if len(values) > 1 else values
    pos, neg = np.asarray(positive), np.asarray(negative)
    j = np.array([(pos >= t).mean() - (neg >= t).mean() for t in cuts])
    best = cuts[j >= j.max() - tolerance]
    return float((best.min() + best.max()) / 2)


def _words(backend, images, prompts, responses, seed: int) -> list[dict]:
    """Every answer word of a batch with its type, target_prob and blind_prob (trajectory state)."""
    batch, errors = backend.prepare(images, prompts, responses)
    if errors:
        raise RuntimeError(f"scene preparation failed: {errors}")
    gen = obtain_response(backend, batch, seed)
    positions = {j: select_positions(backend, gen.ids[j], "all") for j in range(batch.size)}
    targets = build_targets(backend, gen, ProbeConfig(state="trajectory"), positions)
    rows = torch.tensor([t.sample for t in targets], device=backend.device)
    canvas = torch.stack([t.canvas for t in targets]).to(backend.device)
    with torch.no_grad():
        p = target_probs(backend.attribution_forward(batch, rows, canvas, []).logits, targets).double().numpy()
    blind = blind_probs(backend, batch, targets)
    return [dict(sample=t.sample, position=t.position, token=backend.token_str(t.token_id),
                 word_type=backend.word_type(t.token_id) or "other", target_prob=float(a), blind_prob=float(b))
            for t, a, b in zip(targets, p, blind)]


def _condition_inputs(name: str, items: list, captions: list[str]):
    """(images, responses) of a condition: the scenes' own images with their answers generated,
    or the same answers replayed on a blank image or on another scene's image."""
    images = [s.image for s in items]
    if name in ("model", "untrained"):
        return images, None if name == "model" else [s.caption for s in items]
    if name == "blank_image":
        return [np.full_like(im, 128) for im in images], captions
    return images[1:] + images[:1], captions  # other_image: every scene gets its neighbour's image


def _collect(backend, untrained, cfg: dict, seed: int, conditions=CONDITIONS, progress=None) -> dict[str, list[dict]]:
    size = backend.model.config.image_size
    out: dict[str, list[dict]] = {c: [] for c in conditions}
    for lo in range(0, cfg["n"], cfg["batch_size"]):
        items = scenes.make_scenes(seed, lo, min(cfg["batch_size"], cfg["n"] - lo), scenes.SceneConfig(size=size))
        prompts = [s.prompt for s in items]
        own = _words(backend, [s.image for s in items], prompts, None, seed)
        captions = _answers(backend, own, len(items))
        for c in conditions:
            if c == "model":
                out[c] += own
                continue
            images, responses = _condition_inputs(c, items, captions)
            out[c] += _words(untrained if c == "untrained" else backend, images, prompts, responses, seed)
        if progress:
            progress(f"eval-grounding: seed {seed}: {min(lo + cfg['batch_size'], cfg['n'])}/{cfg['n']} scenes")
    return out


def _answers(backend, words: list[dict], n: int) -> list[str]:
    by = [[] for _ in range(n)]
    for w in sorted(words, key=lambda w: (w["sample"], w["position"])):
        by[w["sample"]].append(w["token"])
    return [" ".join(t) for t in by]


def summarise(words: list[dict], threshold: float, resamples: int, seed: int) -> dict:
    """Per word type: n, mean target/blind/reliance (+95% CI), share given without looking; and
    the AUROC of reliance (and of blind_prob) separating content from function words."""
    rel = image_reliance([w["target_prob"] for w in words], [w["blind_prob"] for w in words])
    types = np.array([w["word_type"] for w in words])
    by_type = {}
    for t in sorted(set(types)):
        sel = types == t
        by_type[t] = dict(n=int(sel.sum()), target_prob=float(np.mean([w["target_prob"] for w, s in zip(words, sel) if s])),
                          blind_prob=float(np.mean([w["blind_prob"] for w, s in zip(words, sel) if s])),
                          image_reliance=float(rel[sel].mean()), ci=bootstrap_ci(rel[sel], resamples, seed),
                          given_without_looking=float((rel[sel] < threshold).mean()))
    content, function = np.isin(types, CONTENT), np.isin(types, FUNCTION)
    blind = np.array([w["blind_prob"] for w in words])
    gap = float(rel[content].mean() - rel[function].mean()) if content.any() and function.any() else None
    sweep = {f"{t:g}": dict(content=float((rel[content] < t).mean()) if content.any() else None,
                            function=float((rel[function] < t).mean()) if function.any() else None)
             for t in SWEEP}
    return dict(words=len(words), by_type=by_type, separation=gap, given_without_looking_at=sweep, auroc_reliance=auroc(rel[content], rel[function]),
                auroc_blind_prob=auroc(-blind[content], -blind[function]),
                content_given_without_looking=float((rel[content] < threshold).mean()) if content.any() else None)


def run_eval_grounding(cfg: dict, progress=None) -> dict:
    from dcam.actors.models import load_backend

    t0 = time.perf_counter()
    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    untrained = _untrained_backend(backend, cfg["untrained_seed"])
    sel = _collect(backend, untrained, cfg, cfg["selection_seed"], conditions=("model",), progress=progress)["model"]
    rel = image_reliance([w["target_prob"] for w in sel], [w["blind_prob"] for w in sel])
    types = np.array([w["word_type"] for w in sel])
    threshold = youden_threshold(rel[np.isin(types, CONTENT)], rel[np.isin(types, FUNCTION)])
    words = _collect(backend, untrained, cfg, cfg["seed"], progress=progress)
    res = {c: summarise(w, threshold, cfg["resamples"], cfg["seed"]) for c, w in words.items()}
    return dict(n=cfg["n"], seed=cfg["seed"], selection_seed=cfg["selection_seed"], threshold=threshold,
                conditions=res, seconds=round(time.perf_counter() - t0, 1))


def format_report(r: dict) -> str:
    rows = []
    for c, s in r["conditions"].items():
        for t, d in s["by_type"].items():
            rows.append(dict(condition=c, type=t, n=d["n"], target=d["target_prob"], blind=d["blind_prob"],
                             reliance=d["image_reliance"], blind_rate=d["given_without_looking"]))
    head = (f"eval-grounding: {r['n']} held-out scenes (seed {r['seed']}); threshold {r['threshold']:.3f} "
            f"chosen on seed {r['selection_seed']}")
    aurocs = "; ".join(f"{c}: AUROC {s['auroc_reliance']:.3f}, mean gap {s['separation']:+.3f}"
                       for c, s in r["conditions"].items())
    table = format_table([("condition", 12), ("type", 9)], ["n", "target", "blind", "reliance", "blind_rate"], rows)
    return f"{head}\n{table}\ncontent vs function words, image_reliance:\n  {aurocs}"


@dataclass
class EvalGroundingConfig:
    """conf/eval_grounding.yaml."""
    n: int = key(ge=1, doc="evaluation scenes")
    seed: int = key(doc="evaluation scenes' seed (run once, after the threshold was chosen)")
    selection_seed: int = key(doc="the threshold is chosen on these scenes only")
    model: Any = key(doc="tiny (the shipped organism)")
    batch_size: int = key(ge=1)
    resamples: int = key(ge=1, doc="bootstrap resamples of the 95% intervals")
    untrained_seed: int = key()


def command(args) -> int:
    """`dcam eval-grounding [--json] [k=v ...]`."""
    cfg = to_dict(load_config("eval_grounding", args.overrides, schema=EvalGroundingConfig))
    r = run_eval_grounding(cfg, progress=log)
    emit(r, args.json, format_report(r))
    return 0
