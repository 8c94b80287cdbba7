"""TAM, the Token Activation Map (Li et al., ICCV 2025; METHOD.md §4.3), as a gradient-free map variant.

A_i = ReLU(final-norm image states . W_head[y_i]) (a logit lens over the image tokens); estimated
causal inference (ECI) subtracts the relevance-weighted maps of earlier answer tokens with a
different text (least-squares scale, no cap); then a 3x3 rank Gaussian filter. Prompt tokens are
not in the ECI context: the backend protocol exposes canvas logits only (documented deviation).
"""
from __future__ import annotations

import numpy as np
import torch

from dcam.actors.models.protocol import Backend, PreparedBatch
from dcam.actors.probe.grid import MapVariant, TokenMap, slice_grid
from dcam.actors.refine import rank_gaussian_filter

HOOK = "final_norm"  # forward-only: TAM reads final-norm states, it takes no gradient there


class Tam(MapVariant):
    name = "tam"
    needs_grad = False

    def explain(self, backend: Backend, batch: PreparedBatch, targets: list, cfg) -> list[TokenMap]:
        rows = torch.tensor([t.sample for t in targets], device=backend.device)
        canvas = torch.stack([t.canvas for t in targets]).to(backend.device) if targets else None
        out_maps = []
        for lo in range(0, len(targets), cfg.rows_per_pass):
            sl = slice(lo, lo + cfg.rows_per_pass)
            with torch.no_grad():
                out = backend.attribution_forward(batch, rows[sl], canvas[sl], [HOOK])
                grids = slice_grid(out.activations[HOOK].float(), batch, rows[sl], HOOK,
                                   backend.hook_stream(HOOK), [t.step for t in targets[sl]])
                for k, (t, g) in enumerate(zip(targets[sl], grids)):
                    out_maps.append(_token_map(backend, t, g, out.logits[k].float(), canvas[lo + k]))
        return out_maps


def _token_map(backend: Backend, t, grid: torch.Tensor, logits: torch.Tensor, canvas: torch.Tensor) -> TokenMap:
    lens = backend.unembed(grid).float()  # (h, w, V)
    m = _eci(lens, logits, t, canvas, backend)
    m = rank_gaussian_filter(m[None].cpu().numpy(), 3)[0]
    m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
    p = logits[t.position].softmax(-1)[t.token_id]
    return TokenMap(t.sample, t.position, t.token_id, backend.token_str(t.token_id), t.step,
                    m.astype(np.float32), float(p))


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
