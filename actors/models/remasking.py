"""Deterministic selection for the denoising loops of every backend: which positions a step commits.

Low-confidence remasking commits the k most confident masked positions of a step; DiffusionGemma's
entropy-bound sampler accepts positions in ascending order of entropy. Exactly equal scores are
common (float32 probabilities saturate at 1.0, bf16 far earlier), and `torch.topk` / an unstable
`torch.sort` order such ties in an implementation- and device-dependent way, so a word committed
between tied positions would get a device-dependent canvas, and with it a device-dependent map.
Here a tie always goes to the **lowest position** (a stable sort: equal keys keep index order,
which `torch.sort(stable=True)` guarantees on every device).
"""
from __future__ import annotations

import torch


def order_lowest_first(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """(..., L) long: the positions of each row sorted by score (descending or ascending), equal
    scores in increasing position order."""
    return torch.sort(scores, dim=-1, descending=descending, stable=True).indices


def top_k_lowest_first(confidence: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """(B, L) bool: each row's k most confident positions; among exactly equal confidences the lowest
    position wins, so the commit order is deterministic. `k` is one count or one per row (B,).
    Positions with confidence -inf (committed, or outside the current block) are never taken, so a
    row with fewer than k open positions takes only those."""
    B, L = confidence.shape
    k = torch.as_tensor(k, device=confidence.device)
    k = k.expand(B) if k.dim() == 0 else k.to(confidence.device)
    order = order_lowest_first(confidence, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=confidence.device).expand(B, L))
    return (rank < k[:, None]) & (confidence > float("-inf"))


def propose(logits: torch.Tensor, masked: torch.Tensor, forced: torch.Tensor | None, gens, temperature: float,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """One low-confidence-remasking pass of the LLaDA family: (proposal ids, confidence), confidence
    -inf where not masked. Proposals: the forced canvas, else Gumbel-max in float64 when seeded
    generators are given (exp(z) / (-log u)^T, one (L, V) draw per sample), else the argmax;
    confidence = softmax probability of the proposal, in float64."""
    if forced is not None:
        pred = forced
    elif gens is not None:
        u = torch.stack([torch.rand(logits.shape[1:], generator=g, dtype=torch.float64, device=device) for g in gens])
        pred = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        pred = logits.argmax(-1)
    conf = torch.softmax(logits.double(), dim=-1).gather(-1, pred[..., None])[..., 0]
    return pred, torch.where(masked, conf, torch.full_like(conf, float("-inf")))
