"""What LaViDa and LLaDA-V share: a LLaVA-style multimodal LLaDA (SigLIP tower -> mlp2x_gelu
projector -> anyres views merged with `image_newline` -> LLaDA LM), its prompt, and the parts of
the dcam backend that do not depend on how the model denoises.

Image block of one sample (both models; k = 14 for LaViDa's pooled views, 27 for LLaDA-V):

    [base view: k x k, row-major][grid: rows x (cols + 1): each row of cells then one image_newline]

The grid is the tiles stitched into (tiles_h * k, tiles_w * k), unpadded to the image's aspect ratio
(`anyres.unpad_slices`) and, for LLaDA-V's anyres_max_N, bilinearly shrunk when too large. The
prompt is the checkpoint tokenizer's chat template over [system, user "<image>\\n{question}"],
split at "<image>" and tokenised chunk by chunk exactly as LLaVA's `tokenizer_image_token` does
(including its quirk: when the first chunk starts with BOS, the first token of every later chunk
is dropped, so the "\\n" after the image goes).

`ImageSpan`s: `image_view="grid"` (default, the paper's: the high-resolution grid, newline column
skipped via row_stride = cols + 1) or `"base"` (the fixed k x k squashed view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dcam.actors.models import anyres
from dcam.actors.models.llada_lm import LladaLM, LladaLMConfig
from dcam.actors.models.protocol import SampleError
from dcam.actors.models.siglip_tower import build_tower, tower_features

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for "<image>" in the prompt ids
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
SPECIAL_TOKENS = dict(mask="<|mdm_mask|>", bos="<|startoftext|>", eos="<|endoftext|>", eot="<|eot_id|>",
                      start_header="<|start_header_id|>", end_header="<|end_header_id|>")


@dataclass(frozen=True)
class ImageLayout:
    """How views become image tokens. tile: view size in pixels; pool: bilinear 2-D pooling of each
    view's patch grid to ceil(n / 2) (LaViDa); max_tiles: N of anyres_max_N (LLaDA-V) or None."""
    tile: int = 384
    patch: int = 14
    pinpoints: tuple = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
    pool: bool = True
    max_tiles: int | None = None

    @property
    def side(self) -> int:
        """Cells per side of one view after the projector (and pooling)."""
        n = self.tile // self.patch
        return math.ceil(n / 2) if self.pool else n


@dataclass
class ImageBlock:
    """One sample's image tokens (n, D) and where its views sit inside the block."""
    tokens: torch.Tensor
    base_side: int
    grid_rows: int
    grid_cols: int
    size: tuple[int, int] = field(default=(0, 0))  # (W, H) of the image

    def grid_offset(self) -> int:
        return self.base_side * self.base_side


class LladaMultimodal(nn.Module):
    """vision_tower (SiglipVisionModel) + mm_projector (Linear, GELU, Linear) + image_newline + lm (LladaLM)."""

    def __init__(self, lm_config: LladaLMConfig, tower_config, layout: ImageLayout, dtype=torch.float32):
        super().__init__()
        d = lm_config.hidden_size
        self.layout = layout
        self.vision_tower = build_tower(tower_config, dtype)
        self.mm_projector = nn.Sequential(nn.Linear(tower_config.hidden_size, d), nn.GELU(), nn.Linear(d, d)).to(dtype)
        self.image_newline = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.lm = LladaLM(lm_config, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) -> (V, side, side, D): tower, projector, then LaViDa's bilinear pooling."""
        n = self.layout.tile // self.layout.patch
        f = self.mm_projector(tower_features(self.vision_tower, views))  # (V, n*n, D)
        f = f.view(f.shape[0], n, n, -1)
        if self.layout.pool:  # llava_arch.get_2dPool, mode "bilinear", stride 2
            g = f.permute(0, 3, 1, 2)
            g = F.interpolate(g, size=[math.ceil(n / 2), math.ceil(n / 2)], mode="bilinear")
            f = g.permute(0, 2, 3, 1)
        return f

    def merge(self, feats: torch.Tensor, size: tuple[int, int], tiles: tuple[int, int]) -> ImageBlock:
        """(V, k, k, D) view features of an image of size (W, H) on a tiles (W, H) grid -> its image block."""
        k, D = feats.shape[1], feats.shape[-1]
        tw, th = tiles
        base = feats[0].reshape(k * k, D)
        grid = feats[1:].view(th, tw, k, k, D).permute(4, 0, 2, 1, 3).reshape(D, th * k, tw * k)
        rs, cs = anyres.unpad_slices(size, th * k, tw * k)
        grid = grid[:, rs, cs]
        if self.layout.max_tiles is not None:
            shrink = anyres.anyres_max_shrink(grid.shape[1], grid.shape[2], k, self.layout.max_tiles)
            if shrink is not None:
                grid = F.interpolate(grid[None], list(shrink), mode="bilinear")[0]
        rows, cols = grid.shape[1], grid.shape[2]
        nl = self.image_newline.to(grid.dtype)[:, None, None].expand(D, rows, 1)
        grid = torch.cat([grid, nl], dim=-1).flatten(1, 2).transpose(0, 1)
        return ImageBlock(torch.cat([base, grid]), k, rows, cols, size)


# -- prompt ---------------------------------------------------------------------------------------
def special_ids(tok) -> dict[str, int]:
    """LLaDA's special token ids from the checkpoint's tokenizer (126336, 126080, 126081, 126348, 126346,
    126347 in LLaDA-8B's vocabulary)."""
    out = {}
    for name, text in SPECIAL_TOKENS.items():
        i = tok.convert_tokens_to_ids(text)
        if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id):
            raise ValueError(f"the tokenizer has no {text} token: not a LLaDA tokenizer")
        out[name] = int(i)
    return out


def tokenizer_image_token(text: str, tok) -> list[int]:
    """LLaVA's tokenizer_image_token: tokenise the chunks between "<image>" and join them with -200.
    If the first chunk starts with BOS, BOS is kept once and the first token of every chunk dropped
    (the reference assumes each chunk begins with BOS; LLaDA's tokenizer adds none, so the first
    token after the image goes)."""
    chunks = [list(tok(c).input_ids) for c in text.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    out = chunks[0][:1] if offset else []
    for j, chunk in enumerate(chunks):
        if j:  # insert_separator's [-200] * (offset + 1), cut by the same [offset:] as every chunk
            out += [IMAGE_TOKEN_INDEX]
        out += chunk[offset:]
    return out


def prompt_ids(tok, question: str, system: str = SYSTEM_PROMPT) -> list[int]:
    """The conversation LaViDa ("llada") and LLaDA-V ("llava_llada") build: system turn, user turn
    "<image>\\n{question}", assistant header; the image placeholder as -200."""
    if "<image>" in question:
        raise SampleError("prompt", "the prompt contains '<image>': dcam places the one image itself")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "<image>\n" + question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer_image_token(text, tok)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise SampleError("prompt", f"the chat template rendered {ids.count(IMAGE_TOKEN_INDEX)} image placeholders")
    return ids


def to_pil(image: np.ndarray) -> Image.Image:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4) or min(img.shape[:2]) < 1:
        raise SampleError("image", f"image must be HxWx3, got shape {tuple(img.shape)}")
    return Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
