"""Class-independent seeded weights for parity fixtures (version 1).

The authors' modeling code and dcam's native modules get the same tensors: they depend only on
(seed, sorted reference key names, shapes), never on a class's initialisation. The reference
fixtures (fixtures/*.json, field `weights`) were generated with exactly this function.
"""
from __future__ import annotations

import math
import re

import torch

VERSION = "seeded_weights v1"
NORM_WEIGHT = re.compile(r"(norm|ln_f|ln_\d|layernorm|layer_norm)[^.]*\.weight$", re.IGNORECASE)


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """float32 tensors: one float64 randn draw per key in sorted order; >= 2-D: / sqrt(fan_in); 1-D
    weights of norm layers: 1 + 0.1 * randn; other vectors (biases, image_newline): 0.02 * randn."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:  # matrices, embeddings, conv kernels: fan-in scaled
            w = w / math.sqrt(math.prod(shape[1:]))
        elif NORM_WEIGHT.search(name):  # 1-D scale of a norm layer
            w = 1.0 + 0.1 * w
        else:  # biases and other vectors
            w = 0.02 * w
        out[name] = w.to(torch.float32)
    return out
