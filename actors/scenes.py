"""Procedural grounded scenes: RGB images with 1-3 objects, exact instance masks and a caption.

Every caption word that names something ("red", "circle") names exactly one object, so every
explained word has one ground-truth mask. A scene is a pure function of (seed, index): any shard
of a corpus can be regenerated on its own, and the same seed gives byte-identical output.

Seeds used to train the shipped model are TRAIN_SEEDS; every other seed is held out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

COLOURS = {  # name -> base RGB; each object gets +-20 jitter and a linear shading
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 45, 200),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": (0.12, 0.145), "large": (0.165, 0.19)}  # radius as a fraction of the image side
FUNCTION_WORDS = ("a", "and")
PROMPTS = ("describe the image", "what is in the image", "caption the image")
DEFAULT_PROMPT = PROMPTS[0]
MAX_OBJECTS = 3
RESPONSE_WORDS = 4 * MAX_OBJECTS - 1  # "a c s and a c s and a c s"
TRAIN_SEEDS = (0, 1)  # 0: diffusion training stream, 1: vision-stem pretraining stream
VALIDATION_SEED = 9000  # the training gate's scenes; eval-tiny and eval-cam use other seeds


@dataclass(frozen=True)
class SceneConfig:
    size: int = 64
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    clutter: bool = True
    noise_std: float = 8.0
    prompt: str = DEFAULT_PROMPT


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) uint8, pixel = object id (1..n), 0 = background
    objects: list[dict] = field(default_factory=list)  # left to right: id, words, category, bbox, ...
    caption: str = ""
    prompt: str = DEFAULT_PROMPT

    def objects_json(self) -> str:
        return json.dumps(self.objects, separators=(",", ":"))


def caption_for(objects: list[dict]) -> str:
    return " and ".join(f"a {o['colour']} {o['shape']}" for o in objects)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape; pixel centres are at integer + 0.5."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.82 * r  # same area as the circle, roughly
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base at dy = 0.8 r
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if shape == "cross":
        w = max(1.6, 0.33 * r)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey level + tint + low-frequency colour field + a grating + (later) pixel noise."""
    base = rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)
    coarse = rng.uniform(-25, 25, size=(4, 4, 3))
    t = np.linspace(0, 3, size)
    i0 = np.clip(np.floor(t).astype(int), 0, 2)
    interp = np.zeros((size, 4), np.float32)
    interp[np.arange(size), i0] = 1 - (t - i0)
    interp[np.arange(size), i0 + 1] = t - i0
    field_ = np.stack([interp @ coarse[:, :, c] @ interp.T for c in range(3)], -1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(0.10, 0.4)
    grating = rng.uniform(0, 10) * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 2 * np.pi))
    return base[None, None, :] + field_ + grating[..., None]


def _add_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Small achromatic specks: distractors that no caption word names."""
    size = img.shape[0]
    for _ in range(int(rng.integers(0, 6))):
        s = int(rng.integers(2, 5))
        x0, y0 = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        img[y0:y0 + s, x0:x0 + s, :] = rng.choice([rng.uniform(0, 50), rng.uniform(200, 255)])


def _place_objects(rng: np.random.Generator, n: int, size: int) -> list[dict] | None:
    objs: list[dict] = []
    for _ in range(n):
        for _try in range(200):
            size_name = ("small", "large")[int(rng.integers(2))]
            lo, hi = SIZES[size_name]
            r = rng.uniform(lo * size, hi * size)
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            clash = any(
                abs(cx - o["cx"]) < 6 * size / 64  # keep the left-to-right order unambiguous
                or (abs(cx - o["cx"]) < r + o["r"] + 2 and abs(cy - o["cy"]) < r + o["r"] + 2)
                for o in objs
            )
            if not clash:
                objs.append(dict(cx=cx, cy=cy, r=r, size=size_name,
                                 shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                 colour=list(COLOURS)[int(rng.integers(len(COLOURS)))]))
                break
        else:
            return None
    return sorted(objs, key=lambda o: o["cx"])


def make_scene(seed: int, index: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    """Scene `index` of the stream `seed` (deterministic, independent of any other scene)."""
    rng = np.random.default_rng([int(seed), int(index)])
    size = cfg.size
    img = _background(rng, size)
    if cfg.clutter:
        _add_clutter(rng, img)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objs = None
    while objs is None:
        objs = _place_objects(rng, n, size)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for k, o in enumerate(objs, start=1):
        m = shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size)
        colour = np.array(COLOURS[o["colour"]], np.float32) + rng.uniform(-20, 20, size=3)
        tilt = rng.uniform(-1, 1, size=2)
        shade = 1.0 + 0.075 * ((xx - o["cx"]) * tilt[0] + (yy - o["cy"]) * tilt[1]) / (o["r"] + 1e-6)
        img[m] = colour[None, :] * shade[m][:, None]
        mask[m] = k
        ys, xs = np.nonzero(m)
        o.update(id=k, bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    img = img + rng.normal(0, cfg.noise_std, size=img.shape)
    image = np.clip(img, 0, 255).astype(np.uint8)
    objects = [dict(id=o["id"], words=[o["colour"], o["shape"]], category=o["shape"], colour=o["colour"],
                    shape=o["shape"], size=o["size"], bbox=o["bbox"]) for o in objs]
    return Scene(image=image, mask=mask, objects=objects, caption=caption_for(objs), prompt=cfg.prompt)


def make_scenes(seed: int, start: int, n: int, cfg: SceneConfig = SceneConfig()) -> list[Scene]:
    return [make_scene(seed, i, cfg) for i in range(start, start + n)]


def word_object_ids(objects: list[dict]) -> dict[int, int]:
    """Response word index -> object id, for the caption layout 'a c s and a c s ...'."""
    out = {}
    for j, o in enumerate(objects):
        out[4 * j + 1] = o["id"]
        out[4 * j + 2] = o["id"]
    return out
