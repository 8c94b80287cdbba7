"""Deletion / insertion faithfulness, measured with the model itself (no labels needed).

Image tokens are blanked (content removed, position kept) in the order of the map, most
attributed first. Deletion: the explained token's probability as more and more of the image is
removed, from none to all; a faithful map makes it fall fast (low AUC). Insertion: start from a
blank image and restore tokens most-attributed first; a faithful map makes it rise fast (high
AUC). AUC is the trapezoid mean over the K+1 equally spaced fractions, in [0, 1].

The curves are measured on the map the row reports (the refined map where the method refines;
actors/probe/explain.py refines before measuring). `probe.faithfulness_sample` < 1 measures only
a deterministic sample of the explained words (`in_faithfulness_sample`).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from dcam.actors.models.protocol import Backend, PreparedBatch


def in_faithfulness_sample(sample_id: str, token_index: int, seed: int, fraction: float) -> bool:
    """Whether the word at `token_index` of sample `sample_id` gets faithfulness curves when a
    `fraction` of the explained words is measured. A pure function of (id, token_index, seed):
    blake2b of the three (not Python's salted hash()), read as a uniform number in [0, 1), so a
    rerun or a resumed run picks the same words on any machine; every denoising step and method
    of a word share its choice. fraction >= 1: every word."""
    if not 0 < fraction <= 1:
        raise ValueError(f"faithfulness sample fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(f"{sample_id}\x1f{int(token_index)}\x1f{int(seed)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < fraction


def keep_masks(maps: np.ndarray, k_steps: int, insertion: bool) -> np.ndarray:
    """(N, K+1, h*w) bool masks of image tokens kept at each fraction k/K. Ties in the map are
    broken by token index, so the order is deterministic."""
    n, cells = maps.shape[0], maps[0].size
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")  # most attributed first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(cells)[None].repeat(n, 0), axis=1)
    counts = np.round(np.linspace(0, cells, k_steps + 1)).astype(int)  # tokens affected at step k
    affected = rank[:, None, :] < counts[None, :, None]
    return affected if insertion else ~affected


def curve_auc(probs: np.ndarray) -> np.ndarray:
    """Trapezoid mean of (N, K+1) curves over [0, 1]."""
    return (probs[:, 1:] + probs[:, :-1]).sum(1) / (2 * (probs.shape[1] - 1))


def curve_rows(maps: np.ndarray, k_steps: int) -> np.ndarray:
    """(N, 2K, h*w) bool keep masks of the distinct forward passes per map: the deletion curve's
    K+1 points, then the insertion curve's K-1 interior points. The insertion curve's ends are
    deletion points (nothing kept = deletion at K, everything kept = deletion at 0), so they
    are not run twice."""
    dele = keep_masks(maps, k_steps, insertion=False)
    ins = keep_masks(maps, k_steps, insertion=True)[:, 1:k_steps]
    return np.concatenate([dele, ins], axis=1)


def split_curves(probs: np.ndarray, k_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2K) probabilities of `curve_rows` -> deletion (N, K+1) and insertion (N, K+1)."""
    dele = probs[:, :k_steps + 1]
    ins = np.concatenate([dele[:, k_steps:], probs[:, k_steps + 1:], dele[:, :1]], axis=1)
    return dele, ins


def faithfulness(backend: Backend, batch: PreparedBatch, rows: torch.Tensor, canvas: torch.Tensor,
                 positions: torch.Tensor, token_ids: torch.Tensor, maps: np.ndarray, k_steps: int,
                 rows_per_pass: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(deletion_auc, insertion_auc), each (N,): the AUCs of `faithfulness_curves`."""
    dele, ins = faithfulness_curves(backend, batch, rows, canvas, positions, token_ids, maps, k_steps, rows_per_pass)
    return curve_auc(dele), curve_auc(ins)


def faithfulness_curves(backend: Backend, batch: PreparedBatch, rows: torch.Tensor, canvas: torch.Tensor,
                        positions: torch.Tensor, token_ids: torch.Tensor, maps: np.ndarray, k_steps: int,
                        rows_per_pass: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion) curves, each (N, K+1) probabilities. Needs one grid size for all rows.
    insertion[:, 0] (= deletion[:, K]) is the token's probability with every image token blanked:
    the row's blind_prob (grounding.py), so the probe reuses it for the words it measures.

    2K forward rows per map (see curve_rows), `rows_per_pass` per forward: beyond ~128 rows of
    the tiny model the activations leave the cache and a row costs more, not less."""
    n, per = len(rows), 2 * k_steps
    keep = torch.from_numpy(curve_rows(maps, k_steps)).reshape(n * per, -1)
    rep = lambda t: t.repeat_interleave(per, 0)  # noqa: E731
    r, c, p, y = rep(rows), rep(canvas), rep(positions), rep(token_ids)
    probs = []
    with torch.no_grad():
        for lo in range(0, len(r), rows_per_pass):
            sl = slice(lo, lo + rows_per_pass)
            out = backend.attribution_forward(batch, r[sl], c[sl], [], image_keep=keep[sl].to(backend.device))
            z = out.logits[torch.arange(len(r[sl]), device=out.logits.device), p[sl].to(out.logits.device)]
            probs.append(z.float().softmax(-1).gather(1, y[sl, None].to(z.device))[:, 0].cpu())
    return split_curves(torch.cat(probs).view(n, per).numpy(), k_steps)
