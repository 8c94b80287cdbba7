"""Localisation scores for activation maps (METHOD.md §5): pure numpy over maps and id masks.

Conventions (METHOD.md §5.1): a token-grid map H in [0, 1] is upsampled bilinearly
(align_corners=False, the cv2.resize / torch convention) to the mask size, converted to uint8 as
floor(255 * H) and binarised with Otsu's threshold (pixels > t are foreground). Masks are
integer id images: 0 = background, k > 0 = object k.

Degenerate inputs never crash and give finite scores:
- a map whose uint8 image has a single level (constant or all-zero map) predicts no foreground:
  obj_iou = precision = recall = f1 = 0. (OpenCV's Otsu would return t = 0 there and mark every
  non-zero pixel as foreground; an explanation with no contrast should not score IoU > 0.)
- a map whose upsampled float values are all equal has no argmax: pointing = pointing_tol =
  wrong_object = 0.
- NaN/Inf maps raise ValueError.
Scores that cannot be computed are NaN: every score when there is no mask; the object scores
(obj_iou, precision, recall, f1, f3, pointing, pointing_tol, energy, wrong_object) when the
object id is missing, <= 0 or absent from the mask; obj_iou_bestclass, contrast,
contrast_capped and concentration when the mask has no object pixel; contrast and
contrast_capped also when it has no background pixel (the reference substitutes fg_mean = 1 and
bg_mean = 0 there instead).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dcam.actors.schema import LOCALISATION_SCORES

SCORE_KEYS = LOCALISATION_SCORES  # what score_map returns, in order
CONTRAST_CAP = 20.0
EPS = 1e-8
FLT_EPSILON = float(np.finfo(np.float32).eps)  # OpenCV's class-weight guard in THRESH_OTSU
_CHUNK_ELEMENTS = 2_000_000  # maps x mask pixels per chunk in score_maps


# ----------------------------------------------------------------------------- METHOD.md §5.1

def _validated_maps(maps, ndim: int) -> np.ndarray:
    x = np.asarray(maps, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D map array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("map contains NaN or Inf")
    return x


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear resampling with align_corners=False."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)  # torch/cv2 clamp negative source coordinates to 0
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0, 0.0, 1.0)
    return i0, i1, lam


def upsample_map(maps, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (h, w) or (N, h, w) maps to out_hw, align_corners=False semantics
    (same as torch.nn.functional.interpolate(mode='bilinear', align_corners=False) and
    cv2.resize INTER_LINEAR on float data; no antialiasing). Returns float64."""
    x = np.asarray(maps, dtype=np.float64)
    single = x.ndim == 2
    x = x[None] if single else x
    if x.ndim != 3:
        raise ValueError(f"expected (h, w) or (N, h, w) maps, got shape {x.shape}")
    r0, r1, lr = _linear_taps(x.shape[1], int(out_hw[0]))
    c0, c1, lc = _linear_taps(x.shape[2], int(out_hw[1]))
    rows = x[:, r0, :] * (1.0 - lr)[None, :, None] + x[:, r1, :] * lr[None, :, None]
    out = rows[:, :, c0] * (1.0 - lc) + rows[:, :, c1] * lc
    return out[0] if single else out


def to_uint8(maps) -> np.ndarray:
    """floor(255 * H) as uint8 (the reference's np.uint8(255*H) truncation). Values are first
    clipped to [0, 1] so that out-of-range maps saturate instead of wrapping around."""
    return np.floor(255.0 * np.clip(np.asarray(maps, dtype=np.float64), 0.0, 1.0)).astype(np.uint8)


def otsu_thresholds(u8) -> np.ndarray:
    """Otsu levels of a batch of uint8 images (N, ...) -> (N,) int64 (METHOD.md §5.1).

    Equals OpenCV's THRESH_OTSU on uint8 data: the level t maximising the between-class variance
    q1 q2 (mu1 - mu2)^2 of the classes {<= t} and {> t}, skipping levels where a class weight
    is below FLT_EPSILON, first maximum wins, and t = 0 when no level has positive variance
    (single-level image). Here the criterion is evaluated in the exact form
    (s0 N - n0 S)^2 / (n0 (N - n0)) from integer counts, so on exact ties it may pick a
    different level than OpenCV's float recurrence.
    """
    a = np.asarray(u8)
    if a.dtype != np.uint8:
        raise ValueError(f"otsu_thresholds expects uint8 images, got {a.dtype}")
    flat = a.reshape(len(a), -1).astype(np.int64)
    n_img = len(flat)
    hist = np.bincount((flat + 256 * np.arange(n_img)[:, None]).ravel(),
                       minlength=256 * n_img).reshape(n_img, 256)
    levels = np.arange(256, dtype=np.int64)
    n0 = np.cumsum(hist, axis=1)
    s0 = np.cumsum(hist * levels, axis=1)
    total_n, total_s = n0[:, -1:], s0[:, -1:]
    q1 = n0 / np.maximum(total_n, 1)
    valid = ~((np.minimum(q1, 1 - q1) < FLT_EPSILON) | (np.maximum(q1, 1 - q1) > 1 - FLT_EPSILON))
    num = (s0 * total_n - n0 * total_s).astype(np.float64)
    den = (n0 * (total_n - n0)).astype(np.float64)
    crit = np.where(valid, num * num / np.where(valid, den, 1.0), 0.0)
    best = crit.argmax(axis=1)
    return np.where(crit.max(axis=1) > 0, best, 0).astype(np.int64)


def otsu_threshold(u8) -> int:
    """Otsu level of one uint8 image (see otsu_thresholds)."""
    return int(otsu_thresholds(np.asarray(u8)[None])[0])


def otsu_binarise(map_up) -> tuple[np.ndarray, int]:
    """(foreground bool mask, Otsu level) of one upsampled float map; a single-level uint8
    image gives an empty foreground (module docstring)."""
    u8 = to_uint8(_validated_maps(map_up, 2))
    t = otsu_threshold(u8)
    if u8.min() == u8.max():
        return np.zeros(u8.shape, dtype=bool), t
    return u8 > t, t


def otsu_level_of_map(map_hw, out_hw: tuple[int, int]) -> int:
    """Otsu level (uint8 scale) of a token-grid map after upsampling to out_hw (TAM fg_thresh)."""
    return otsu_binarise(upsample_map(_validated_maps(map_hw, 2), out_hw))[1]


# ----------------------------------------------------------------------------- METHOD.md §5.2-5.3

def precision_recall(pred, gt) -> tuple[float, float]:
    """Pixel precision |P & G| / |P| (0 if P is empty) and recall |P & G| / |G| (NaN if G is
    empty) of boolean masks."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = float(np.logical_and(pred, gt).sum())
    n_pred, n_gt = float(pred.sum()), float(gt.sum())
    return (inter / n_pred if n_pred else 0.0), (inter / n_gt if n_gt else float("nan"))


def detection_f1(precision: float, recall: float) -> float:
    """2PR / (P + R), or 0 if either is 0 (METHOD.md §5.3); NaN propagates."""
    if np.isnan(precision) or np.isnan(recall):
        return float("nan")
    if precision <= 0 or recall <= 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def iou(pred, gt) -> float:
    """|P & G| / |P | G| of boolean masks (0 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = float(np.logical_or(pred, gt).sum())
    return float(np.logical_and(pred, gt).sum()) / union if union else 0.0


def obj_iou(pred, mask_ids, object_id) -> float:
    """Class-specific Obj-IoU (TAM style, METHOD.md §5.2): IoU of P with mask == object_id.
    NaN if the object id is missing, <= 0 or absent from the mask."""
    mask_ids = np.asarray(mask_ids)
    if object_id is None or object_id <= 0 or not np.any(mask_ids == object_id):
        return float("nan")
    return iou(pred, mask_ids == object_id)


def obj_iou_bestclass(pred, mask_ids) -> tuple[float, float, float]:
    """Reference Obj-IoU (METHOD.md §5.2, parity): max over present classes c > 0 of IoU(P, G == c),
    with precision and recall at the argmax class (first on ties). NaN if no object."""
    mask_ids = np.asarray(mask_ids)
    best = (float("nan"), float("nan"), float("nan"))
    for c in np.unique(mask_ids[mask_ids > 0]):
        v = iou(pred, mask_ids == c)
        if np.isnan(best[0]) or v > best[0]:
            best = (v, *precision_recall(pred, mask_ids == c))
    return best


# ----------------------------------------------------------------------------- METHOD.md §5.5-5.7

def contrast_ratio(map_up, mask_ids) -> float:
    """mean(H on all objects) / (mean(H on background) + 1e-8) (METHOD.md §5.5); NaN when the mask
    has no object pixel or no background pixel."""
    h, fg = np.asarray(map_up, np.float64), np.asarray(mask_ids) > 0
    if not fg.any() or fg.all():
        return float("nan")
    return float(h[fg].mean() / (h[~fg].mean() + EPS))


def capped_contrast(contrast, cap: float = CONTRAST_CAP):
    """min(C / 20, 1) (METHOD.md §5.5); NaN propagates."""
    return np.minimum(np.asarray(contrast, dtype=np.float64) / cap, 1.0)


def concentration(map_up, mask_ids) -> float:
    """Share of map mass on annotated objects: sum_FG H / (sum H + 1e-8) (METHOD.md §5.6); NaN when
    the mask has no object pixel."""
    h, fg = np.asarray(map_up, np.float64), np.asarray(mask_ids) > 0
    if not fg.any():
        return float("nan")
    return float(h[fg].sum() / (h.sum() + EPS))


def f3_harmonic(obj_iou_v, contrast_capped_v, conc_v):
    """3 / (1/IoU + 1/C~ + 1/Conc) if all three are > 0, else 0; NaN if any is NaN (METHOD.md §5.7)."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (obj_iou_v, contrast_capped_v, conc_v))
    pos = (a > 0) & (b > 0) & (c > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = 3.0 / (1.0 / a + 1.0 / b + 1.0 / c)
    out = np.where(pos, h, 0.0)
    return np.where(np.isnan(a) | np.isnan(b) | np.isnan(c), np.nan, out)


def f3_geometric(obj_iou_v, contrast_capped_v, conc_v):
    """(IoU * C~ * Conc)^(1/3) if all three are > 0, else 0; NaN if any is NaN (METHOD.md §5.7)."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (obj_iou_v, contrast_capped_v, conc_v))
    pos = (a > 0) & (b > 0) & (c > 0)
    out = np.where(pos, np.cbrt(np.where(pos, a * b * c, 0.0)), 0.0)
    return np.where(np.isnan(a) | np.isnan(b) | np.isnan(c), np.nan, out)


def f3_table(mean_obj_iou, mean_contrast, mean_conc):
    """The paper tables' F3 (METHOD.md §5.7): harmonic mean of the dataset means
    (mean Obj-IoU, min(mean contrast / 20, 1), mean concentration), fractions in [0, 1].
    Not the mean of per-image F3."""
    return f3_harmonic(mean_obj_iou, capped_contrast(mean_contrast), mean_conc)


# ----------------------------------------------------------------------------- pointing etc.

def _argmax_or_none(map_up) -> tuple[int, int] | None:
    h = np.asarray(map_up, np.float64)
    if h.max() == h.min():
        return None
    return tuple(int(v) for v in np.unravel_index(int(h.argmax()), h.shape))


def pointing_game(map_up, obj_mask, radius_px: float = 0.0) -> float:
    """1.0 if the map's argmax pixel (first in raster order) lies in obj_mask dilated by a disk
    of radius_px (Euclidean distance between pixel centres <= radius_px), else 0.0.
    radius_px = 0 is the strict game. A constant map has no argmax and scores 0."""
    obj_mask = np.asarray(obj_mask, bool)
    peak = _argmax_or_none(map_up)
    if peak is None or not obj_mask.any():
        return 0.0
    if obj_mask[peak]:
        return 1.0
    ys, xs = np.nonzero(obj_mask)
    return float(np.min((ys - peak[0]) ** 2 + (xs - peak[1]) ** 2) <= radius_px ** 2)


def energy_in_mask(map_up, obj_mask) -> float:
    """Share of map mass on one object: sum_obj H / (sum H + 1e-8)."""
    h = np.asarray(map_up, np.float64)
    return float(h[np.asarray(obj_mask, bool)].sum() / (h.sum() + EPS))


def wrong_object(map_up, mask_ids, object_id) -> float:
    """1.0 if the argmax pixel lands on an object other than object_id, else 0.0 (constant
    map: 0.0); NaN if object_id is missing, <= 0 or absent from the mask."""
    mask_ids = np.asarray(mask_ids)
    if object_id is None or object_id <= 0 or not np.any(mask_ids == object_id):
        return float("nan")
    peak = _argmax_or_none(map_up)
    if peak is None:
        return 0.0
    at = mask_ids[peak]
    return float(at > 0 and at != object_id)


def func_iou(map_grid, fg_thresh: float) -> float:
    """TAM Func-IoU of one function-word map (METHOD.md §5.4): fraction of its token-grid pixels,
    on the uint8 scale floor(255 H), strictly below fg_thresh (the mean Otsu level of the
    noun maps, see otsu_level_of_map)."""
    return float((to_uint8(_validated_maps(map_grid, 2)) < fg_thresh).mean())


def f1_iou(mean_obj_iou: float, mean_func_iou: float) -> float:
    """TAM F1-IoU = 2 O F / (O + F) over dataset means (0 when O + F = 0)."""
    s = mean_obj_iou + mean_func_iou
    return float(2 * mean_obj_iou * mean_func_iou / s) if s > 0 else 0.0


# ----------------------------------------------------------------------------- per-row scores

def _object_ids(object_ids, n: int) -> np.ndarray:
    ids = [object_ids] * n if object_ids is None or np.isscalar(object_ids) else list(object_ids)
    if len(ids) != n:
        raise ValueError(f"need one object id per map: {len(ids)} for {n} maps")
    return np.array([-1 if v is None or v <= 0 else int(v) for v in ids], dtype=np.int64)


def _label_image(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(present object ids (K,), label image with 0 = background and 1..K = those ids)."""
    ids = np.unique(mask[mask > 0])
    lab = np.where(mask > 0, np.searchsorted(ids, mask) + 1, 0)
    return ids, lab.ravel()


def _label_columns(objs: np.ndarray, ids_present: np.ndarray) -> np.ndarray:
    """Label (1..K) of each requested object id, 0 where it is absent from the mask."""
    if len(ids_present) == 0:
        return np.zeros(len(objs), dtype=np.intp)
    pos = np.minimum(np.searchsorted(ids_present, objs), len(ids_present) - 1)
    return np.where((objs > 0) & (ids_present[pos] == objs), pos + 1, 0)


def _per_label_sums(values: np.ndarray, lab: np.ndarray, n_labels: int) -> np.ndarray:
    """(n, K+1) sums of values (n, P) per label (bool values -> counts)."""
    n = len(values)
    idx = (lab[None, :] + n_labels * np.arange(n)[:, None]).ravel()
    w = values.ravel().astype(np.float64)
    return np.bincount(idx, weights=w, minlength=n * n_labels).reshape(n, n_labels)


def _distance_maps(mask: np.ndarray, wanted) -> dict[int, np.ndarray]:
    """Euclidean distance (pixels) from every pixel to the nearest pixel of each wanted id."""
    return {int(k): ndimage.distance_transform_edt(mask != k).ravel() for k in wanted}


def _region_scores(flat: np.ndarray, lab: np.ndarray, n_labels: int) -> dict:
    """Otsu IoU counts and mass per label for a chunk of upsampled maps (n, P)."""
    u8 = to_uint8(flat)
    t = otsu_thresholds(u8)
    single_level = u8.min(axis=1) == u8.max(axis=1)
    pred = (u8 > t[:, None]) & ~single_level[:, None]
    return {"inter": _per_label_sums(pred, lab, n_labels), "n_pred": pred.sum(axis=1),
            "mass": _per_label_sums(flat, lab, n_labels), "total": flat.sum(axis=1)}


def _chunk_rows(flat, lab, mask_flat, col, ids_present, dist, radius) -> dict:
    """All SCORE_KEYS for one chunk of upsampled maps (n, P); col: label column per row or 0."""
    n_labels = len(ids_present) + 1
    r = _region_scores(flat, lab, n_labels)
    g = np.bincount(lab, minlength=n_labels).astype(np.float64)
    inter, n_pred = r["inter"], r["n_pred"].astype(np.float64)
    rows = np.arange(len(flat))
    has_obj = col > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = inter[:, 1:] / (n_pred[:, None] + g[None, 1:] - inter[:, 1:])
        i_named = inter[rows, col]
        out = {"obj_iou": ious[rows, np.maximum(col - 1, 0)] if ious.size else np.full(len(flat), np.nan),
               "obj_iou_bestclass": ious.max(axis=1) if ious.size else np.full(len(flat), np.nan),
               "precision": np.where(n_pred > 0, i_named / n_pred, 0.0),
               "recall": i_named / g[col]}
        n_fg, n_bg = g[1:].sum(), g[0]
        fg_mass = r["mass"][:, 1:].sum(axis=1)
        contrast = (fg_mass / n_fg) / (r["mass"][:, 0] / n_bg + EPS)
        out["contrast"] = contrast if n_fg > 0 and n_bg > 0 else np.full(len(flat), np.nan)
        out["concentration"] = fg_mass / (r["total"] + EPS) if n_fg > 0 else np.full(len(flat), np.nan)
        out["energy"] = r["mass"][rows, col] / (r["total"] + EPS)
    out["contrast_capped"] = capped_contrast(out["contrast"])
    pr, rc = out["precision"], out["recall"]
    out["f1"] = np.where((pr > 0) & (rc > 0), 2 * pr * rc / np.where(pr + rc > 0, pr + rc, 1), 0.0)
    peak = flat.argmax(axis=1)
    has_peak = flat.max(axis=1) > flat.min(axis=1)
    target = np.where(has_obj, ids_present[np.maximum(col - 1, 0)] if len(ids_present) else -1, -1)
    at = mask_flat[peak]
    out["pointing"] = (has_peak & (at == target)).astype(np.float64)
    d = np.array([dist[int(k)][p] if ok else np.inf for k, p, ok in zip(target, peak, has_obj)])
    out["pointing_tol"] = (has_peak & (d <= radius)).astype(np.float64)
    out["wrong_object"] = (has_peak & (at > 0) & (at != target)).astype(np.float64)
    for k in ("obj_iou", "precision", "recall", "f1", "energy", "pointing", "pointing_tol",
              "wrong_object"):
        out[k] = np.where(has_obj, out[k], np.nan)
    out["f3"] = f3_harmonic(out["obj_iou"], out["contrast_capped"], out["concentration"])
    return out


def token_cell_px(mask_hw: tuple[int, int], map_hw: tuple[int, int]) -> float:
    """Size of one token cell in mask pixels, the one rule for the tolerant pointing radius
    (METHOD.md §5.8): the larger side, max(H/h, W/w), so that a non-square image's radius does not
    depend on which side is measured."""
    return max(mask_hw[0] / map_hw[0], mask_hw[1] / map_hw[1])


def score_maps(maps, mask_ids, object_ids, grid_cell_px: float | None = None) -> dict:
    """Per-row scores (SCORE_KEYS -> float64 (N,)) of N token-grid maps that share one mask.

    maps: (N, h, w) in [0, 1]; mask_ids: (H, W) int id mask or None; object_ids: one id per
    map (or a scalar for all; None / <= 0 = no named object); grid_cell_px: size of one token
    cell in mask pixels (default token_cell_px: max(H/h, W/w), what the pipeline and eval-cam use);
    the tolerant pointing radius is half of it.
    See the module docstring for NaN and degenerate-map rules.
    """
    x = _validated_maps(maps, 3)
    n = len(x)
    objs = _object_ids(object_ids, n)
    out = {k: np.full(n, np.nan) for k in SCORE_KEYS}
    if mask_ids is None or n == 0:
        return out
    mask = np.asarray(mask_ids)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask_ids must be a 2-D integer id image, got {mask.dtype} {mask.shape}")
    ids_present, lab = _label_image(mask)
    col = _label_columns(objs, ids_present)
    dist = _distance_maps(mask, np.unique(objs[col > 0]))
    if grid_cell_px is None:
        grid_cell_px = token_cell_px(mask.shape, x.shape[1:])
    step = max(1, _CHUNK_ELEMENTS // mask.size)
    for s in range(0, n, step):
        flat = upsample_map(x[s:s + step], mask.shape).reshape(len(x[s:s + step]), -1)
        res = _chunk_rows(flat, lab, mask.ravel(), col[s:s + step], ids_present, dist,
                          grid_cell_px / 2.0)
        for k in SCORE_KEYS:
            out[k][s:s + step] = res[k]
    return out


def score_map(map_hw, mask_ids, object_id, grid_cell_px: float | None = None) -> dict:
    """All per-row scores (dict of SCORE_KEYS -> float) of one token-grid map (METHOD.md §5).

    map_hw: (h, w) map in [0, 1] at token-grid resolution, upsampled here to the mask size;
    mask_ids: (H, W) integer id mask (0 = background) or None; object_id: id of the explained
    token's object (None if it names none); grid_cell_px: token-cell size in mask pixels.
    obj_iou, precision, recall, f1 and f3 are class-specific (the named object);
    obj_iou_bestclass is the reference's per-class max (parity).
    """
    x = _validated_maps(map_hw, 2)
    res = score_maps(x[None], mask_ids, [object_id], grid_cell_px)
    return {k: float(v[0]) for k, v in res.items()}
