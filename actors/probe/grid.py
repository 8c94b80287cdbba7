"""A token map and where it comes from: the image grid sliced out of a hooked hidden sequence."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dcam.actors.models.protocol import PreparedBatch, StructuralStateError


@dataclass
class TokenMap:
    """One explained token's map: sample index in the prepared batch, canvas position, token,
    the denoising step of its state (None: teacher-forced), the map and the token's probability;
    `state` is the output row's state label (targets.state_label; None: the method's state);
    `blind_prob` / `image_reliance`: the answer-grounding pair of the same state (probe.grounding)."""
    sample: int
    position: int
    token_id: int
    token: str
    step: int | None
    raw_map: np.ndarray  # (h, w) float32 in [0, 1]
    target_prob: float
    deletion_auc: float = float("nan")
    insertion_auc: float = float("nan")
    state: str | None = None
    blind_prob: float = float("nan")
    image_reliance: float = float("nan")
    faithfulness_sampled: bool | None = None  # None: faithfulness off; False: not in probe.faithfulness_sample


def slice_grid(act: torch.Tensor, batch: PreparedBatch, rows: torch.Tensor, hook: str, stream: str,
               steps: list[int | None]) -> list[torch.Tensor]:
    """Per row, the (h, w, D) grid of the hooked activation. Raises StructuralStateError when the
    hooked state does not hold the full image span (never substitutes defaults)."""
    out = []
    for k, i in enumerate(rows.tolist()):
        span = batch.spans[i]
        if span.stream != stream or act.shape[1] < span.end:
            raise StructuralStateError(
                f"hook {hook!r} (stream {stream!r}, sequence length {act.shape[1]}) at denoising step {steps[k]} does not "
                f"hold the image span (stream {span.stream!r}, positions up to {span.end}): not a structurally valid state")
        pos = torch.as_tensor(span.positions(), device=act.device)
        out.append(act[k, pos])
    return out


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (h, w) map to [0, 1]; a constant map becomes all zeros (no signal), never NaN."""
    if not torch.isfinite(maps).all():
        raise ValueError("map contains NaN or Inf before normalisation")
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=1e-30), torch.zeros_like(maps))


class MapVariant:
    """How one method forms its maps: `explain` returns one TokenMap per target, in order."""
    name: str = "base"
    needs_grad: bool = True

    def explain(self, backend, batch: PreparedBatch, targets: list, cfg) -> list[TokenMap]:
        raise NotImplementedError
