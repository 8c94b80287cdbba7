"""The backend protocol: what the probe needs from any dMLLM.

A backend wraps one model replica and answers five questions, batch-first:
1. prepare: images + prompts [+ given responses] -> model inputs, with per-sample image spans;
2. generate: the response ids and the per-position commit step of the denoising trajectory;
3. forced_trajectory: the same for a given response (the order the model would commit it);
4. attribution_forward: a grad-enabled forward over frozen weights for N attribution rows (each
   row = one sample's canvas state), returning canvas logits and the hooked activations;
5. metadata: where the image grid lives in each hooked stream (ImageSpan), token strings,
   word categories (for the same-category contrast).

Encoder-decoder models (DiffusionGemma) hook the encoder stream, whose sequence holds the image
tokens; decoder-only masked-diffusion models (LLaDA-V, LaViDa, the tiny model) hook the single
LM stream. A span's positions may skip separator tokens (LaViDa's per-row newline) or be
non-contiguous (explicit index array).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np
import torch

from dcam.actors.errors import KindedError


class StructuralStateError(RuntimeError):
    """The hooked state does not hold the full image span: no valid map can be formed from it."""


class SampleError(KindedError, ValueError):
    """One sample cannot be prepared (bad prompt, unknown words, ...). `kind` classifies it."""


@dataclass(frozen=True)
class ImageSpan:
    """Where one sample's image grid lives in a hooked hidden sequence.

    Grid cell (r, c) sits at sequence position start + r * row_stride + c, unless `index` gives
    the (rows, cols) positions explicitly. row_stride > cols means separator tokens follow each
    row (LaViDa appends one `image_newline` per row: row_stride = cols + 1); they are dropped.
    """
    stream: str
    start: int
    rows: int
    cols: int
    row_stride: int | None = None
    index: np.ndarray | None = field(default=None, compare=False)

    def positions(self) -> np.ndarray:
        """(rows, cols) int64 sequence positions of the grid cells."""
        if self.index is not None:
            return np.asarray(self.index, dtype=np.int64).reshape(self.rows, self.cols)
        stride = self.row_stride or self.cols
        r = np.arange(self.rows)[:, None]
        c = np.arange(self.cols)[None, :]
        return (self.start + r * stride + c).astype(np.int64)

    @property
    def end(self) -> int:
        """One past the last position the span needs (separators included)."""
        return int(self.positions().max()) + 1


@dataclass
class PreparedBatch:
    """Model inputs for B samples plus their metadata. `inputs` is backend-specific."""
    inputs: dict
    spans: list[ImageSpan]
    prompts: list[str]
    given_ids: list[list[int] | None]
    image_sizes: list[tuple[int, int]]  # (height, width) of each original image
    source_index: list[int] = field(default_factory=list)  # input index of each prepared sample
    # backend-private tensors derived from `inputs` (e.g. image features reused by every attribution
    # and faithfulness pass); never copied into sub-batches, so it cannot go stale
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.spans)


@dataclass
class Generation:
    """Canvas ids (B, L) and per-position commit step (B, L; -1 = never committed)."""
    ids: torch.Tensor
    commit_step: torch.Tensor
    n_steps: int
    source: str  # "generated" | "given"
    final_step: torch.Tensor | None = None  # (B,) each row's last denoising step; None = n_steps - 1

    def state_before(self, rows: torch.Tensor, step: torch.Tensor, mask_id: int) -> torch.Tensor:
        """(N, L) canvas of sample rows[n] just before denoising step step[n] ran."""
        ids, commit = self.ids[rows], self.commit_step[rows]
        keep = (commit >= 0) & (commit < step[:, None])
        return torch.where(keep, ids, torch.full_like(ids, mask_id))


@dataclass
class AttributionOutput:
    logits: torch.Tensor  # (N, L, V) canvas logits
    activations: dict[str, torch.Tensor]  # hook name -> (N, T_stream, D), part of the autograd graph


class Backend(abc.ABC):
    """One dMLLM replica. Implementations: TinyBackend, DiffusionGemmaBackend."""

    model_id: str
    mask_id: int
    eos_id: int
    eos_ids: tuple[int, ...] = ()  # every id that ends an answer; () = (eos_id,)
    response_len: int
    device: torch.device

    # -- inputs -----------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, images: list[np.ndarray], prompts: list[str],
                responses: list[str | None] | None = None) -> tuple[PreparedBatch, dict[int, SampleError]]:
        """Returns the batch of the samples that could be prepared and, per failed input index,
        the error. PreparedBatch rows follow the input order with failed samples left out."""

    # -- denoising --------------------------------------------------------------------------
    @abc.abstractmethod
    def generate(self, batch: PreparedBatch, seed: int = 0) -> Generation: ...

    @abc.abstractmethod
    def forced_trajectory(self, batch: PreparedBatch) -> Generation:
        """Commit order of batch.given_ids under the model's own confidence schedule."""

    # -- attribution ------------------------------------------------------------------------
    @abc.abstractmethod
    def hook_points(self) -> list[str]: ...

    def named_hooks(self) -> dict[str, str]:
        """Named hook points the method presets refer to: 'early' (output of block
        ceil(n_layers / 4) - 1: Diffusion-CAM's default hook), 'mid' (output of the middle block,
        n_layers // 2 - 1: the reference's Grad-CAM) and 'mid_norm2' (the post-attention norm of
        the middle block, which LLaVA-CAM hooks)."""
        raise NotImplementedError

    @abc.abstractmethod
    def hook_stream(self, hook: str) -> str:
        """Which hidden stream a hook point lives in ("lm", "encoder", "decoder")."""

    @abc.abstractmethod
    def attribution_forward(self, batch: PreparedBatch, rows: torch.Tensor, canvas: torch.Tensor,
                            hooks: list[str], image_keep: torch.Tensor | None = None) -> AttributionOutput:
        """Forward for N rows (rows[n] = sample index, canvas[n] = its canvas state) with the
        hooked activations in the autograd graph. image_keep (N, n_grid) bool, when given,
        blanks the image tokens where False (used by deletion/insertion faithfulness)."""

    @abc.abstractmethod
    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head applied to final-norm hidden states (for logit-lens baselines such as TAM)."""

    # -- tokens -----------------------------------------------------------------------------
    @abc.abstractmethod
    def token_str(self, token_id: int) -> str: ...

    @abc.abstractmethod
    def decode(self, ids) -> str: ...

    def word_category(self, token_id: int) -> str | None:
        """Category of a word for the same-category contrast (None = no category)."""
        return None

    def category_members(self, category: str) -> list[int]:
        return []

    def is_content(self, token_id: int) -> bool:
        """Whether a response token names something (worth explaining by default)."""
        return token_id not in (self.eos_id, self.mask_id)

    def word_type(self, token_id: int) -> str | None:
        """Coarse type for reports (e.g. colour/shape/function); None when unknown."""
        return None
