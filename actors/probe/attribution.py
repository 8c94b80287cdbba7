"""The gradient pass every gradient map variant shares (pytorch-grad-cam's base: it owns the hook
and the gradient; a variant only says how the map is formed from A and G).

One grad-enabled forward over frozen weights for all (sample, token) rows of a chunk, the
contrastive score per row, `torch.autograd.grad` w.r.t. the hooked activation only (rows are
independent, so the gradient of the sum is every row's gradient); then each sample's image grid
is sliced from the hooked stream (separator columns dropped) after checking the structurally
valid state rule, and the variant forms and min-max normalises the map.
"""
from __future__ import annotations

import numpy as np
import torch

from dcam.actors.models.protocol import Backend, PreparedBatch
from dcam.actors.probe.contrast import target_probs, target_scores
from dcam.actors.probe.grid import MapVariant, TokenMap, normalise_maps, slice_grid
from dcam.actors.probe.targets import ProbeConfig, Target


class GradientVariant(MapVariant):
    """A map formed from the hooked activations A and their gradients G (both (N, h, w, D) float32
    over each row's image grid); subclasses implement `form` only, returning (N, h, w)."""

    def form(self, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def explain(self, backend: Backend, batch: PreparedBatch, targets: list[Target], cfg: ProbeConfig) -> list[TokenMap]:
        """Maps for all targets, `cfg.rows_per_pass` rows per forward/backward."""
        out: list[TokenMap] = []
        for lo in range(0, len(targets), cfg.rows_per_pass):
            out += self._chunk(backend, batch, targets[lo:lo + cfg.rows_per_pass], cfg)
        return out

    def _chunk(self, backend: Backend, batch: PreparedBatch, targets: list[Target], cfg: ProbeConfig) -> list[TokenMap]:
        rows = torch.tensor([t.sample for t in targets], device=backend.device)
        canvas = torch.stack([t.canvas for t in targets]).to(backend.device)
        stream = backend.hook_stream(cfg.hook)
        with torch.enable_grad():
            out = backend.attribution_forward(batch, rows, canvas, [cfg.hook])
            act = out.activations[cfg.hook]
            scores = target_scores(backend, out.logits, targets, cfg.contrast)
            grad = torch.autograd.grad(scores.sum(), act)[0]
        probs = target_probs(out.logits.detach(), targets)
        steps = [t.step for t in targets]
        A = slice_grid(act.detach().float(), batch, rows, cfg.hook, stream, steps)
        G = slice_grid(grad.float(), batch, rows, cfg.hook, stream, steps)
        if len({a.shape for a in A}) == 1:  # one grid size: form all maps in one call
            maps = list(normalise_maps(self.form(torch.stack(A), torch.stack(G))))
        else:
            maps = [normalise_maps(self.form(a[None], g[None]))[0] for a, g in zip(A, G)]
        del out, act, grad, scores
        return [TokenMap(t.sample, t.position, t.token_id, backend.token_str(t.token_id), t.step,
                         m.cpu().numpy().astype(np.float32), float(p)) for t, m, p in zip(targets, maps, probs)]
