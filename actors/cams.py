"""Map variants: how a token-grid map is formed from hooked activations A and their gradients G.

pytorch-grad-cam's split: the attribution pass (actors/probe.py) owns hooks and the gradient;
each variant here only says how the map is formed. Shapes: A, G are (N, h, w, D) float32 over
the image grid of one sample per row; every variant returns (N, h, w), not yet normalised.
"""
from __future__ import annotations

import torch


class MapVariant:
    name: str = "base"
    needs_grad: bool = True

    def form(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PaperCam(MapVariant):
    """The paper's literal formula (spec §2.7): alpha_d = spatial mean of ReLU(G); map = channel
    mean of ReLU(alpha_d * A). Since alpha >= 0, ReLU(alpha*A) = alpha*ReLU(A): one einsum, no
    per-channel loop. On a pre-norm residual stream this localises poorly (LayerNorm scale
    invariance makes G orthogonal to A); measured in `dcam eval-cam`."""
    name = "paper_cam"

    def form(self, A, G):
        alpha = G.clamp(min=0).mean(dim=(1, 2))  # (N, D)
        return torch.einsum("nd,nhwd->nhw", alpha, A.clamp(min=0)) / A.shape[-1]


class GradCamReference(MapVariant):
    """The authors' Grad-CAM baseline (spec §4.1): unclamped pooled gradient, per-channel ReLU,
    channel mean."""
    name = "grad_cam"

    def form(self, A, G):
        alpha = G.mean(dim=(1, 2))
        return (alpha[:, None, None, :] * A).clamp(min=0).mean(-1)


class GradNorm(MapVariant):
    """Per-token gradient norm: how strongly the explained score depends on each image token."""
    name = "grad_norm"

    def form(self, A, G):
        return G.norm(dim=-1)


class GradXAct(MapVariant):
    """Token-wise gradient x activation, ReLU of the channel sum."""
    name = "grad_x_act"

    def form(self, A, G):
        return (G * A).sum(-1).clamp(min=0)


class LlavaCam(MapVariant):
    """LLaVA-CAM (spec §4.2): ReLU(G) pooled, weighted channel mean, ReLU, divided by its max,
    hard threshold 0.5."""
    name = "llava_cam"
    threshold = 0.5

    def form(self, A, G):
        alpha = G.clamp(min=0).mean(dim=(1, 2))
        m = (alpha[:, None, None, :] * A).mean(-1).clamp(min=0)
        m = m / m.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)
        return torch.where(m < self.threshold, torch.zeros_like(m), m)


VARIANTS = {v.name: v for v in (PaperCam(), GradCamReference(), GradNorm(), GradXAct(), LlavaCam())}


def get_variant(name: str) -> MapVariant:
    if name not in VARIANTS:
        raise KeyError(f"unknown map variant {name!r}; known: {sorted(VARIANTS)} (and 'tam')")
    return VARIANTS[name]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (h, w) map to [0, 1]; a constant map becomes all zeros (no signal), never NaN."""
    if not torch.isfinite(maps).all():
        raise ValueError("map contains NaN or Inf before normalisation")
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=1e-30), torch.zeros_like(maps))
