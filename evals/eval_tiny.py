"""Caption quality of the tiny model on fresh scenes: exact match, per-word, colour and shape."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dcam.actors import scenes
from dcam.actors.models import load_backend
from dcam.actors.models.tiny_dmllm import (
    TinyDMLLM,
    WordTokenizer,
    denoise,
    encode_prompts,
    encode_responses,
    normalise_pixels,
)
from dcam.actors.scenes import TRAIN_SEEDS, VALIDATION_SEED
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit


def caption_quality(model: TinyDMLLM, tok: WordTokenizer, seed: int, n: int, batch_size: int = 64,
                    steps: int | None = None) -> dict:
    """Greedy captions for scenes (seed, 0..n-1) compared position by position with the truth."""
    c = model.config
    items = scenes.make_scenes(seed, 0, n, scenes.SceneConfig(size=c.image_size))
    truth = encode_responses(tok, [s.caption for s in items], c.response_len)
    gen = []
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            chunk = items[lo:lo + batch_size]
            pixels = normalise_pixels(torch.from_numpy(np.stack([s.image for s in chunk])))
            prompts = encode_prompts(tok, [s.prompt for s in chunk], c.max_prompt_len)
            gen.append(denoise(model, pixels, prompts, steps=steps).ids)
    gen = torch.cat(gen)
    words = truth != tok.eos_id
    pos = torch.arange(c.response_len)[None]
    colour = words & (pos % 4 == 1)
    shape = words & (pos % 4 == 2)
    hit = gen == truth
    frac = lambda sel: float((hit & sel).sum() / sel.sum().clamp(min=1))  # noqa: E731
    return dict(n=n, exact_match=float(hit.all(1).float().mean()), word_acc=frac(words),
                colour_acc=frac(colour), shape_acc=frac(shape))


@dataclass
class EvalTinyConfig:
    """conf/eval_tiny.yaml."""
    n: int = key(ge=1)
    seed: int = key()
    batch_size: int = key(ge=1)
    model: Any = key()


def command(args) -> int:
    """`dcam eval-tiny [--json] [k=v ...]`."""
    cfg = to_dict(load_config("eval_tiny", args.overrides, schema=EvalTinyConfig))
    if cfg["seed"] in TRAIN_SEEDS or cfg["seed"] == VALIDATION_SEED:
        print(f"seed {cfg['seed']} was used to train or select the model; pick another", file=sys.stderr)
        return 2
    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    q = caption_quality(backend.model, backend.tok, seed=cfg["seed"], n=cfg["n"], batch_size=cfg["batch_size"])
    table = (f"held-out scenes (seed {cfg['seed']}): n={q['n']}\n"
             f"  exact match   {q['exact_match']:.4f}\n  word accuracy {q['word_acc']:.4f}\n"
             f"  colour words  {q['colour_acc']:.4f}\n  shape words   {q['shape_acc']:.4f}")
    emit(q, args.json, table)
    return 0
