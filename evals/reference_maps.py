"""Reference maps of the evaluation table: random, centre, grid ceiling, objectness oracle.
(The method baselines, authors' Grad-CAM, LLaVA-CAM and TAM, are map variants in
actors/probe/variants.py.)"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_maps(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w)).astype(np.float32)


def centre_map(h: int, w: int) -> np.ndarray:
    """Isotropic Gaussian at the grid centre, sigma = a quarter of the side."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.exp(-((xx - w / 2) ** 2 / (2 * (w / 4) ** 2) + (yy - h / 2) ** 2 / (2 * (h / 4) ** 2))).astype(np.float32)


def grid_ceiling_map(object_mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """The true object mask average-pooled to the token grid: the best any grid map can do."""
    m = torch.from_numpy(object_mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, (h, w))[0, 0].numpy()


def objectness_oracle(mask_ids: np.ndarray, object_id: int) -> dict:
    """Expected scores of a map uniform over all objects (knows where objects are, not which one
    the word names): IoU, pointing and energy all equal the target's share of object area."""
    a_t = float((mask_ids == object_id).sum())
    a_u = float((mask_ids > 0).sum())
    share = a_t / a_u if a_u else 0.0
    return dict(obj_iou=share, pointing=share, pointing_tol=share, energy=share, wrong_object=1 - share)
