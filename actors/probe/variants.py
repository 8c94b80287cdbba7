"""Map variants: how a token-grid map is formed (METHOD.md §2.9, §4).

pytorch-grad-cam's split: `attribution.GradientVariant` owns the hook and the gradient pass;
each gradient variant here only says how the map is formed from the hooked activations A and
their gradients G ((N, h, w, D) float32 over one sample's image grid per row), returning
(N, h, w), not yet normalised. TAM (gradient-free logit lens) is a variant too (tam.py).
"""
from __future__ import annotations

import torch

from dcam.actors.probe.attribution import GradientVariant
from dcam.actors.probe.grid import MapVariant
from dcam.actors.probe.tam import Tam


class PaperCam(GradientVariant):
    """The paper's literal formula (METHOD.md §2.9): alpha_d = spatial mean of ReLU(G); map = channel
    mean of ReLU(alpha_d * A). Since alpha >= 0, ReLU(alpha*A) = alpha*ReLU(A): one einsum, no
    per-channel loop. On a pre-norm residual stream this localises poorly (LayerNorm scale
    invariance makes G orthogonal to A); measured in `dcam eval-cam`."""
    name = "paper_cam"

    def form(self, A, G):
        alpha = G.clamp(min=0).mean(dim=(1, 2))  # (N, D)
        return torch.einsum("nd,nhwd->nhw", alpha, A.clamp(min=0)) / A.shape[-1]


class GradCamReference(GradientVariant):
    """The authors' Grad-CAM baseline (METHOD.md §4.1): unclamped pooled gradient, per-channel ReLU,
    channel mean."""
    name = "grad_cam"

    def form(self, A, G):
        alpha = G.mean(dim=(1, 2))
        return (alpha[:, None, None, :] * A).clamp(min=0).mean(-1)


class GradNorm(GradientVariant):
    """Per-token gradient norm: how strongly the explained score depends on each image token."""
    name = "grad_norm"

    def form(self, A, G):
        return G.norm(dim=-1)


class GradXAct(GradientVariant):
    """Token-wise gradient x activation, ReLU of the channel sum."""
    name = "grad_x_act"

    def form(self, A, G):
        return (G * A).sum(-1).clamp(min=0)


class LlavaCam(GradientVariant):
    """LLaVA-CAM (METHOD.md §4.2): ReLU(G) pooled, weighted channel mean, ReLU, divided by its max,
    hard threshold 0.5."""
    name = "llava_cam"
    threshold = 0.5

    def form(self, A, G):
        alpha = G.clamp(min=0).mean(dim=(1, 2))
        m = (alpha[:, None, None, :] * A).mean(-1).clamp(min=0)
        m = m / m.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)
        return torch.where(m < self.threshold, torch.zeros_like(m), m)


VARIANTS: dict[str, MapVariant] = {v.name: v for v in (PaperCam(), GradCamReference(), GradNorm(), GradXAct(),
                                                        LlavaCam(), Tam())}


def get_variant(name: str) -> MapVariant:
    if name not in VARIANTS:
        raise KeyError(f"unknown map variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]
