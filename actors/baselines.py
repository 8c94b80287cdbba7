"""Baselines: TAM (gradient-free logit lens + ECI, spec §4.3) and the reference maps of the
evaluation table (random, centre, objectness oracle, grid ceiling)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from actors.models.protocol import Backend, PreparedBatch


def tam_pass(backend: Backend, batch: PreparedBatch, targets, cfg) -> list:
    """TAM on a dMLLM: A_i = ReLU(final-norm image states . W_head[y_i]); ECI subtracts the
    relevance-weighted maps of earlier answer tokens with different text (least-squares scale,
    no cap), then a 3x3 rank Gaussian filter. Prompt tokens are not in the ECI context here: the
    backend protocol exposes canvas logits only (documented deviation)."""
    from actors.probe import TokenMap, slice_grid
    from actors.refine import rank_gaussian_filter

    rows = torch.tensor([t.sample for t in targets], device=backend.device)
    canvas = torch.stack([t.canvas for t in targets]).to(backend.device) if targets else None
    out_maps = []
    for lo in range(0, len(targets), cfg.rows_per_pass):
        sl = slice(lo, lo + cfg.rows_per_pass)
        with torch.no_grad():
            out = backend.attribution_forward(batch, rows[sl], canvas[sl], ["final_norm"])
            grids = slice_grid(out.activations["final_norm"].float(), batch, rows[sl], "final_norm",
                               backend.hook_stream("final_norm"), [t.step for t in targets[sl]])
            for k, (t, g) in enumerate(zip(targets[sl], grids)):
                lens = backend.unembed(g).float()  # (h, w, V)
                m = _eci(lens, out.logits[k].float(), t, canvas[lo + k], backend)
                m = rank_gaussian_filter(m[None].cpu().numpy(), 3)[0]
                m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
                p = out.logits[k, t.position].float().softmax(-1)[t.token_id]
                out_maps.append(TokenMap(t.sample, t.position, t.token_id, backend.token_str(t.token_id), t.step,
                                         m.astype(np.float32), float(p)))
    return out_maps


def _eci(lens: torch.Tensor, logits: torch.Tensor, t, canvas: torch.Tensor, backend: Backend) -> torch.Tensor:
    own = lens[..., t.token_id].clamp(min=0)
    here = backend.token_str(t.token_id)
    ctx = [k for k in range(t.position) if int(canvas[k]) != backend.mask_id
           and backend.token_str(int(canvas[k])) != here]
    if not ctx:
        return own
    rel = torch.stack([logits[k, t.token_id].clamp(min=0) for k in ctx])
    w = rel / (rel.sum() + 1e-8)
    interference = sum(w[j] * lens[..., int(canvas[k])].clamp(min=0) for j, k in enumerate(ctx))
    denom = (interference * interference).sum()
    scale = (own * interference).sum() / denom if denom > 0 else torch.tensor(0.0)
    return (own - scale * interference).clamp(min=0)


def random_maps(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w)).astype(np.float32)


def centre_map(h: int, w: int) -> np.ndarray:
    """Isotropic Gaussian at the grid centre, sigma = a quarter of the side."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.exp(-((xx - w / 2) ** 2 / (2 * (w / 4) ** 2) + (yy - h / 2) ** 2 / (2 * (h / 4) ** 2))).astype(np.float32)


def grid_ceiling_map(object_mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """The true object mask average-pooled to the token grid: the best any grid map can do."""
    m = torch.from_numpy(object_mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, (h, w))[0, 0].numpy()


def objectness_oracle(mask_ids: np.ndarray, object_id: int) -> dict:
    """Expected scores of a map uniform over all objects (knows where objects are, not which one
    the word names): IoU, pointing and energy all equal the target's share of object area."""
    a_t = float((mask_ids == object_id).sum())
    a_u = float((mask_ids > 0).sum())
    share = a_t / a_u if a_u else 0.0
    return dict(obj_iou=share, pointing=share, pointing_tol=share, energy=share, wrong_object=1 - share)
