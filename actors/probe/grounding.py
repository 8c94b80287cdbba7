"""Answer grounding: would the model have said this word without looking? (METHOD.md §5.12)

Per explained token, in its own attribution state (the canvas the map explains):
- `target_prob`: the token's probability with the image;
- `blind_prob`: its probability with every image token blanked, exactly the blanking the
  deletion/insertion curves use (the backend's `attribution_forward(image_keep=...)`: content
  removed, position and token type kept) — the start of the insertion curve;
- `image_reliance` = target_prob - blind_prob: how much of the model's confidence in the word the
  image supplies. A difference of probabilities, not a log-ratio: it is bounded in [-1, 1], it is
  ~0 both for a word the model says anyway (p ~ p_blind ~ 1) and for a word it says with no
  confidence at all (p ~ p_blind ~ 0), and a log-ratio explodes for the tiny blind probabilities
  of well-grounded content words, which would make every corpus mean dominated by its noisiest
  rows. A word is counted as "given without looking" when image_reliance < the run's threshold
  (`report.grounding_threshold`).

This is a property of the answer, not of a map: a map can miss the evidence (low faithfulness)
while the word still depends on the image, and a word the model would say blind can still get a
sharp map.
"""
from __future__ import annotations

import numpy as np
import torch

from dcam.actors.models.protocol import Backend, PreparedBatch
from dcam.actors.probe.targets import Target


def blank_image_keep(backend: Backend, batch: PreparedBatch, samples: list[int]) -> torch.Tensor:
    """(N, rows*cols) all-False keep masks: every image cell of each row's sample blanked."""
    cells = [batch.spans[i].rows * batch.spans[i].cols for i in samples]
    if len(set(cells)) != 1:
        raise ValueError("blank_image_keep needs one grid size per call; group rows by grid size")
    return torch.zeros((len(samples), cells[0]), dtype=torch.bool, device=backend.device)


def blind_probs(backend: Backend, batch: PreparedBatch, targets: list[Target], rows_per_pass: int = 128) -> np.ndarray:
    """(N,) float64 probability of each target's token at its position, in its canvas state, with
    every image token blanked. One logits-only forward row per target, `rows_per_pass` per call;
    rows of different grid sizes go in separate calls."""
    out = np.full(len(targets), np.nan)
    by_cells: dict[int, list[int]] = {}
    for k, t in enumerate(targets):
        span = batch.spans[t.sample]
        by_cells.setdefault(span.rows * span.cols, []).append(k)
    with torch.no_grad():
        for idx in by_cells.values():
            for lo in range(0, len(idx), rows_per_pass):
                chunk = [targets[k] for k in idx[lo:lo + rows_per_pass]]
                out[idx[lo:lo + rows_per_pass]] = _blind_chunk(backend, batch, chunk)
    return out


def _blind_chunk(backend: Backend, batch: PreparedBatch, chunk: list[Target]) -> np.ndarray:
    samples = [t.sample for t in chunk]
    rows = torch.tensor(samples, device=backend.device)
    canvas = torch.stack([t.canvas for t in chunk]).to(backend.device)
    keep = blank_image_keep(backend, batch, samples)
    logits = backend.attribution_forward(batch, rows, canvas, [], image_keep=keep).logits
    n = torch.arange(len(chunk), device=logits.device)
    pos = torch.tensor([t.position for t in chunk], device=logits.device)
    y = torch.tensor([t.token_id for t in chunk], device=logits.device)
    return logits[n, pos].double().softmax(-1)[n, y].cpu().numpy()


def add_blind_probs(backend: Backend, batch: PreparedBatch, targets: list[Target], maps: list, rows_per_pass: int) -> None:
    """Sets `blind_prob` and `image_reliance` on each target's map (maps[k] explains targets[k]):
    one no-grad forward row per attribution row, batched across the probe batch, for the maps whose
    blind_prob the faithfulness curves did not already give (the start of their insertion curve)."""
    missing = [k for k, m in enumerate(maps) if np.isnan(m.blind_prob)]
    if missing:
        measured = blind_probs(backend, batch, [targets[k] for k in missing], rows_per_pass)
        for k, b in zip(missing, measured):
            maps[k].blind_prob = float(b)
    blind = [m.blind_prob for m in maps]
    reliance = image_reliance([m.target_prob for m in maps], blind)
    for m, b, r in zip(maps, blind, reliance):
        m.blind_prob, m.image_reliance = float(b), float(r)


def image_reliance(target_prob, blind_prob) -> np.ndarray:
    """target_prob - blind_prob, elementwise (NaN where either is missing)."""
    return np.asarray(target_prob, dtype=np.float64) - np.asarray(blind_prob, dtype=np.float64)
