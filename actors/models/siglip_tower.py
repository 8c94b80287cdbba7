"""The SigLIP vision tower of LaViDa and LLaDA-V, as transformers' `SiglipVisionModel`.

Both models load SigLIP-so400m-patch14-384 (LLaDA-V: the siglip2 weights, through the SigLIP v1
class) with LLaVA's `SigLipVisionTower`: the last encoder layer is deleted and the attention-pooling
head replaced by Identity, and the image feature is the last remaining layer's output *before*
`post_layernorm` (which stays in the checkpoint, unused). With 27 layers that is hidden_states[-2]
of the full tower, the `mm_vision_select_layer -2` of their training scripts. Tokens: (384/14)^2 =
27 x 27 = 729 per view, row-major.

The tower's shape is read from the checkpoint's tensors (width, depth, MLP width, patch size and
image size all follow from the weight shapes); the head count cannot be, so it comes from an
optional `vision_config` entry of config.json (dcam's tiny test checkpoints write one) and
otherwise is so400m's 16; likewise the image size (so400m: 384, not readable from the weights).
"""
from __future__ import annotations

import math
import re

import torch

# LLaVA's tower module path inside the multimodal checkpoints -> transformers SiglipVisionModel names
VISION_RULES = ((r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", r"vision_tower.\1"),)
SO400M_HEADS = 16
SO400M_IMAGE_SIZE = 384


def tower_config(shapes: dict[str, tuple[int, ...]], prefix: str = "vision_tower.", heads: int | None = None,
                 image_size: int | None = None, layer_norm_eps: float = 1e-6):
    """SiglipVisionConfig for the tower whose (native-named) tensors have these shapes. image_size
    (default so400m's 384) cannot be read from the weights (384 // 14 = 27 patches: the last 6 pixels
    are never seen), only checked against the position-embedding grid."""
    from transformers import SiglipVisionConfig

    patch = shapes[prefix + "embeddings.patch_embedding.weight"]  # (hidden, 3, p, p)
    n_pos = shapes[prefix + "embeddings.position_embedding.weight"][0]
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"vision tower position embedding has {n_pos} rows, not a square grid")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    if layers != set(range(len(layers))) or not layers:
        raise ValueError(f"vision tower encoder layers are not 0..n-1: {sorted(layers)}")
    image_size = int(image_size or SO400M_IMAGE_SIZE)
    if image_size // patch[2] != side:
        raise ValueError(f"vision tower: image size {image_size} with patch {patch[2]} does not give the "
                         f"{side} x {side} position grid of the weights (set vision_config.image_size in config.json)")
    hidden = patch[0]
    heads = int(heads or SO400M_HEADS)
    if hidden % heads:
        raise ValueError(f"vision tower width {hidden} is not divisible by {heads} heads (set vision_config."
                         "num_attention_heads in config.json)")
    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
                              num_hidden_layers=len(layers), num_attention_heads=heads, num_channels=patch[1],
                              image_size=image_size, patch_size=patch[2], hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=layer_norm_eps, vision_use_head=False)


def build_tower(config, dtype: torch.dtype = torch.float32):
    from transformers import SiglipVisionModel

    config._attn_implementation = "sdpa"
    return SiglipVisionModel(config).to(dtype)


def tower_features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) pixels -> (N, (S/p)^2, D): the last layer's output, before post_layernorm."""
    h = tower.embeddings(pixels.to(tower.dtype))
    for layer in tower.encoder.layers:
        h = layer(h, attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
    return h
