"""The Diffusion-CAM probe: explain the response tokens of a batch, every method sharing one
generation (METHOD.md §2).

1. obtain the response (targets.obtain_response) and the explained positions;
2. per method, build the attribution rows in the method's state (targets.build_targets);
3. form the maps with the method's variant (variants.get_variant(...).explain);
4. optionally, deletion/insertion faithfulness curves of the maps the rows report: each map is
   first refined with its method's refinement (actors.refine.refine_explained, the function and
   config the CPU stage writes the `map` column with), so the curves belong to the written map;
   `probe.faithfulness_sample` < 1 measures a deterministic sample of the words (faithfulness.py);
5. answer grounding of every row: blind_prob, image_reliance (grounding.py, METHOD.md §5.12).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from dcam.actors.methods import NO_REFINEMENT
from dcam.actors.models.protocol import Backend, SampleError
from dcam.actors.probe.faithfulness import curve_auc, faithfulness_curves, in_faithfulness_sample
from dcam.actors.probe.grid import TokenMap
from dcam.actors.probe.grounding import add_blind_probs
from dcam.actors.probe.targets import (
    ProbeConfig,
    Target,
    answer_length,
    build_targets,
    end_ids,
    obtain_response,
    select_positions,
)
from dcam.actors.probe.variants import get_variant
from dcam.actors.refine import RefineConfig, refine_explained


@dataclass
class SampleExplanation:
    """Everything the probe says about one input sample."""
    index: int  # input index
    prompt: str = ""
    response: str = ""
    response_ids: list[int] = field(default_factory=list)
    canvas_ids: list[int] = field(default_factory=list)  # the whole final answer canvas (SICD's parity token set)
    response_source: str = ""
    maps: dict[str, list[TokenMap]] = field(default_factory=dict)  # method name -> token maps
    error: SampleError | None = None


def explain_batch(backend: Backend, images: list[np.ndarray], prompts: list[str], methods: dict[str, ProbeConfig],
                  responses: list[str | None] | None = None, words: list[list[str] | None] | None = None,
                  seed: int = 0, timings: dict[str, float] | None = None,
                  refines: dict[str, RefineConfig] | None = None, ids: list[str] | None = None) -> list[SampleExplanation]:
    """Explain a batch with every method in `methods` (shared generation). One result per input,
    in input order; samples that cannot be prepared or targeted carry `error`.
    timings: if given, seconds spent per phase (response, attribution, faithfulness) are added, and
    `faithfulness_refine`, the part of `faithfulness` spent refining the maps before their curves.
    refines: method -> its RefineConfig; the faithfulness curves are measured on the refined maps
    (a method missing here: on the raw map, i.e. refinement `none`). ids: the input samples' ids,
    which choose the words of a faithfulness sample (needed when probe.faithfulness_sample < 1)."""
    results = [SampleExplanation(index=i) for i in range(len(images))]
    batch, errors = backend.prepare(images, prompts, responses)
    for i, e in errors.items():
        results[i].error = e
    if batch.size == 0:
        return results
    with _phase(timings, "response"):
        gen = obtain_response(backend, batch, seed)
    positions = _positions(backend, batch, gen, next(iter(methods.values())).targets, words, results)
    for name, cfg in methods.items():
        targets = build_targets(backend, gen, cfg, positions)
        with _phase(timings, "attribution"):
            maps = get_variant(cfg.variant).explain(backend, batch, targets, cfg)
        if cfg.faithfulness_steps:
            with _phase(timings, "faithfulness"):
                refine = (refines or {}).get(name, RefineConfig(**NO_REFINEMENT))
                _add_faithfulness(backend, batch, gen, targets, maps, cfg, refine, _sample_ids(batch, ids), timings)
        with _phase(timings, "grounding"):
            add_blind_probs(backend, batch, targets, maps, cfg.rows_per_pass)
        for t, m in zip(targets, maps):
            m.state = t.state
            results[batch.source_index[t.sample]].maps.setdefault(name, []).append(m)
    for j, i in enumerate(batch.source_index):
        r = results[i]
        r.prompt, r.response_source = batch.prompts[j], ("given" if batch.given_ids[j] is not None else "generated")
        n = answer_length(gen.ids[j], end_ids(backend))
        r.response_ids = gen.ids[j, :n].tolist()
        r.canvas_ids = gen.ids[j].tolist()
        r.response = backend.decode(r.response_ids)
    return results


@contextmanager
def _phase(timings: dict[str, float] | None, name: str):
    """Adds the block's wall seconds to timings[name] (no-op when timings is None). On a GPU the
    queue is drained at both ends, so kernels still running are not billed to the next phase."""
    if timings is None:
        yield
        return
    _sync_cuda()
    t0 = time.perf_counter()
    yield
    _sync_cuda()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _positions(backend, batch, gen, how, words, results) -> dict[int, list[int]]:
    out = {}
    for j, i in enumerate(batch.source_index):
        try:
            out[j] = select_positions(backend, gen.ids[j], how, words[i] if words else None)
        except SampleError as e:
            results[i].error = e
    return out


def _sample_ids(batch, ids: list[str] | None) -> list[str] | None:
    """Per prepared-batch sample, the id of its input (None when the caller gave no ids)."""
    return None if ids is None else [str(ids[i]) for i in batch.source_index]


def _add_faithfulness(backend, batch, gen, targets: list[Target], maps: list[TokenMap], cfg: ProbeConfig,
                      refine: RefineConfig, sample_ids: list[str] | None, timings: dict | None = None) -> None:
    """Deletion/insertion AUCs of the sampled targets' refined maps (grouped by grid shape, as
    the CPU stage groups its refinement; refinement is per map, so grouping changes nothing).
    Targets outside the sample keep NaN AUCs and faithfulness_sampled=False."""
    if cfg.faithfulness_sample < 1 and sample_ids is None:
        raise ValueError("probe.faithfulness_sample < 1 needs the samples' ids (explain_batch(ids=...))")
    by_shape: dict[tuple, list[int]] = {}
    for k, (t, m) in enumerate(zip(targets, maps)):
        m.faithfulness_sampled = in_faithfulness_sample(
            sample_ids[t.sample] if sample_ids is not None else "", t.position, cfg.seed, cfg.faithfulness_sample)
        if m.faithfulness_sampled:
            by_shape.setdefault(m.raw_map.shape, []).append(k)
    ends = end_ids(backend)
    for idx in by_shape.values():
        sel = [targets[k] for k in idx]
        canvases = [gen.ids[t.sample].tolist() for t in sel]
        lengths = [answer_length(gen.ids[t.sample], ends) for t in sel]
        t0 = time.perf_counter()
        fine = refine_explained(np.stack([maps[k].raw_map for k in idx]), refine, canvases, lengths)
        if timings is not None:
            timings["faithfulness_refine"] = timings.get("faithfulness_refine", 0.0) + time.perf_counter() - t0
        dele, ins = faithfulness_curves(
            backend, batch, torch.tensor([t.sample for t in sel], device=backend.device),
            torch.stack([t.canvas for t in sel]).to(backend.device),
            torch.tensor([t.position for t in sel]), torch.tensor([t.token_id for t in sel]),
            fine, cfg.faithfulness_steps)
        dele_auc, ins_auc = curve_auc(dele), curve_auc(ins)
        for j, k in enumerate(idx):  # the insertion curve starts fully blanked: that is the blind_prob
            maps[k].deletion_auc, maps[k].insertion_auc = float(dele_auc[j]), float(ins_auc[j])
            maps[k].blind_prob = float(ins[j, 0])
