"""`dcam eval-cam`: every map method scored against exact masks on fresh held-out scenes.

Explained words: the colour and shape words the model generated correctly (each names exactly
one object). Rows: reference maps (random, centre, objectness oracle, grid ceiling), an
untrained-model sanity check, the baselines (authors' Grad-CAM, LLaVA-CAM, TAM), every variant x
hook point, attribution-state and contrast ablations, Diffusion-CAM raw, each refinement module
alone, and the full method. Columns are dataset means; F3 is the paper's aggregation (harmonic
mean of the dataset-mean Obj-IoU, capped contrast and concentration).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, List

import numpy as np
import torch

from dcam.actors import scenes
from dcam.actors.methods import NO_REFINEMENT, resolve_method
from dcam.actors.numeric import nanmean
from dcam.actors.probe.faithfulness import faithfulness
from dcam.actors.probe.targets import answer_length, build_targets, end_ids, obtain_response
from dcam.actors.probe.variants import get_variant
from dcam.actors.refine import RefineConfig, refine_explained
from dcam.actors.schema import TABLE_SCORES
from dcam.actors.scores import f3_table, score_map
from dcam.evals import reference_maps
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log
from dcam.pipeline.console import format_table as console_table

COLUMNS = TABLE_SCORES
DEFAULT_ROW = "diffusion_cam"


def method_table(backend, cfg: dict) -> dict:
    """name -> ProbeConfig for every gradient/TAM row (refinement rows are derived later)."""
    rows = {}
    for preset in ("grad_cam", "llava_cam", "tam", "diffusion_cam_raw"):
        rows[preset if preset != "grad_cam" else "grad_cam_ref"] = resolve_method(preset, backend)[0]
    base = rows["diffusion_cam_raw"]
    for v in cfg["variants"]:
        for h in cfg["hooks"]:
            rows[f"{v}@{h}"] = replace(base, variant=v, hook=h)
    for state in ("remask_target", "teacher_forced"):
        rows[f"state={state}"] = replace(base, state=state)
    for contrast in ("logit", "logprob"):
        rows[f"contrast={contrast}"] = replace(base, contrast=contrast)
    wanted = set(cfg["faithfulness_rows"])
    return {k: replace(v, rows_per_pass=cfg["rows_per_pass"],
                       faithfulness_steps=cfg["faithfulness_steps"] if k in wanted else 0) for k, v in rows.items()}


def refine_rows(base: RefineConfig) -> dict[str, RefineConfig]:
    out = {f"+{m}": replace(base, **{**NO_REFINEMENT, m: True}) for m in ("akd", "dacg", "cba", "sicd")}
    out[DEFAULT_ROW] = base
    return out


def correct_words(gen_ids: torch.Tensor, items: list[scenes.Scene], tok) -> dict[int, list[tuple[int, int]]]:
    """sample -> [(canvas position, object id)] of correctly generated colour/shape words."""
    out = {}
    for j, s in enumerate(items):
        truth = tok.encode(s.caption)
        pos_obj = scenes.word_object_ids(s.objects)
        out[j] = [(p, o) for p, o in pos_obj.items() if p < len(truth) and int(gen_ids[j, p]) == truth[p]]
    return out


def _score_rows(maps: np.ndarray, masks: list[np.ndarray], objs: list[int], cell_px: float | None) -> list[dict]:
    return [score_map(m, mk, o, cell_px) for m, mk, o in zip(maps, masks, objs)]


def _untrained_backend(backend, seed: int):
    """Same architecture, random weights: its maps must fall to chance (sanity check)."""
    from dcam.actors.models.tiny_backend import TinyBackend
    from dcam.actors.models.tiny_dmllm import TinyDMLLM

    torch.manual_seed(seed)
    return TinyBackend(TinyDMLLM(backend.model.config), backend.tok, model_id="untrained", device=str(backend.device))


class _Table:
    """Accumulates per-row scores and deletion AUCs per method name."""

    def __init__(self):
        self.scores: dict[str, list[dict]] = {}
        self.deletion: dict[str, list[float]] = {}

    def add(self, name: str, rows: list[dict], deletion=None):
        self.scores.setdefault(name, []).extend(rows)
        if deletion is not None:
            self.deletion.setdefault(name, []).extend(float(d) for d in deletion)

    def summary(self) -> list[dict]:
        out = []
        for name, rows in self.scores.items():
            mean = {c: nanmean([r.get(c, math.nan) for r in rows])
                    for c in COLUMNS if c not in ("f3", "deletion_auc")}
            mean["f3"] = f3_table(mean["obj_iou"], mean["contrast"], mean["concentration"])
            d = self.deletion.get(name)
            mean["deletion_auc"] = float(np.mean(d)) if d else None
            out.append({"name": name, **mean, "n": len(rows)})
        return out


def _faith(backend, batch, targets, maps: np.ndarray, k: int) -> np.ndarray:
    dele, _ = faithfulness(backend, batch, torch.tensor([t.sample for t in targets], device=backend.device),
                           torch.stack([t.canvas for t in targets]).to(backend.device),
                           torch.tensor([t.position for t in targets]), torch.tensor([t.token_id for t in targets]),
                           maps, k)
    return dele


def _eval_chunk(backend, untrained, methods, ref_rows, items, cfg, table: _Table, chunk_seed: int) -> None:
    batch, errors = backend.prepare([s.image for s in items], [s.prompt for s in items])
    if errors:
        raise RuntimeError(f"scene preparation failed: {errors}")
    gen = obtain_response(backend, batch, seed=0)
    words = correct_words(gen.ids, items, backend.tok)
    positions = {j: [p for p, _ in w] for j, w in words.items()}
    row_meta = [(j, o) for j, w in words.items() for _, o in w]
    masks = [items[j].mask for j, _ in row_meta]
    objs = [o for _, o in row_meta]
    cell = None  # tolerant pointing radius: scores.token_cell_px (max(H/h, W/w)) / 2, as in dcam run
    k = cfg["faithfulness_steps"]
    default_targets = default_raw = None
    for name, pc in methods.items():
        targets = build_targets(backend, gen, pc, positions)
        maps = get_variant(pc.variant).explain(backend, batch, targets, pc)
        raw = np.stack([m.raw_map for m in maps])
        table.add(name, _score_rows(raw, masks, objs, cell), _faith(backend, batch, targets, raw, k) if pc.faithfulness_steps else None)
        if name == "diffusion_cam_raw":
            default_targets, default_raw, default_cfg = targets, raw, pc
    # the pipeline's refinement call (same SICD token set: actors.refine.sicd_token_ids); each row's
    # deletion AUC is measured on that row's maps (raw rows above on raw maps, these on refined ones)
    canvases = [gen.ids[t.sample].tolist() for t in default_targets]
    lengths = [answer_length(gen.ids[t.sample], end_ids(backend)) for t in default_targets]
    for rname, rc in ref_rows.items():
        refined = refine_explained(default_raw, rc, canvases, lengths)
        want = rname in cfg["faithfulness_rows"] and k
        table.add(rname, _score_rows(refined, masks, objs, cell), _faith(backend, batch, default_targets, refined, k) if want else None)
    _reference_rows(backend, batch, default_targets, default_raw.shape[1:], masks, objs, cell, cfg, table, chunk_seed)
    u = get_variant(default_cfg.variant).explain(untrained, batch, default_targets, default_cfg)
    table.add("untrained_model", _score_rows(np.stack([m.raw_map for m in u]), masks, objs, cell))


def _reference_rows(backend, batch, targets, hw, masks, objs, cell, cfg, table: _Table, seed: int) -> None:
    h, w = hw
    k = cfg["faithfulness_steps"]
    rnd = reference_maps.random_maps(len(targets), h, w, seed)
    ctr = np.repeat(reference_maps.centre_map(h, w)[None], len(targets), 0)
    for name, maps in (("random", rnd), ("centre", ctr)):
        want = name in cfg["faithfulness_rows"] and k
        table.add(name, _score_rows(maps, masks, objs, cell), _faith(backend, batch, targets, maps, k) if want else None)
    ceiling = np.stack([reference_maps.grid_ceiling_map(mk == o, h, w) for mk, o in zip(masks, objs)])
    table.add("grid_ceiling", _score_rows(ceiling, masks, objs, cell))
    table.add("objectness_oracle", [reference_maps.objectness_oracle(mk, o) for mk, o in zip(masks, objs)])


def run_eval_cam(cfg: dict, log=print) -> dict:
    from dcam.actors.models import load_backend

    t0 = time.perf_counter()
    backend = load_backend(cfg["model"] if isinstance(cfg["model"], dict) else {"backend": "tiny"})
    untrained = _untrained_backend(backend, cfg["untrained_seed"])
    methods = method_table(backend, cfg)
    ref_rows = refine_rows(resolve_method("diffusion_cam", backend)[1])
    size = backend.model.config.image_size
    table = _Table()
    for lo in range(0, cfg["n"], cfg["batch_size"]):
        items = scenes.make_scenes(cfg["seed"], lo, min(cfg["batch_size"], cfg["n"] - lo), scenes.SceneConfig(size=size))
        _eval_chunk(backend, untrained, methods, ref_rows, items, cfg, table, chunk_seed=cfg["seed"] * 100003 + lo)
        log(f"eval-cam: {min(lo + cfg['batch_size'], cfg['n'])}/{cfg['n']} scenes, {time.perf_counter() - t0:.0f}s")
    rows = table.summary()
    by = {r["name"]: r for r in rows}
    return dict(rows=rows, default=DEFAULT_ROW, grid_ceiling_obj_iou=by["grid_ceiling"]["obj_iou"],
                n_words=by[DEFAULT_ROW]["n"], n_scenes=cfg["n"], seed=cfg["seed"],
                seconds=round(time.perf_counter() - t0, 1))


def format_table(result: dict) -> str:
    title = (f"eval-cam: {result['n_words']} correctly generated object words on {result['n_scenes']} held-out scenes "
             f"(seed {result['seed']}); default = {result['default']}")
    return title + "\n" + console_table([("name", 28)], list(COLUMNS), result["rows"])


@dataclass
class EvalCamConfig:
    """conf/eval_cam.yaml."""
    n: int = key(ge=1)
    seed: int = key()
    selection_seed: int = key()
    model: Any = key()
    batch_size: int = key(ge=1)
    rows_per_pass: int = key(ge=1)
    faithfulness_steps: int = key(ge=0)
    faithfulness_rows: List[str] = key()
    untrained_seed: int = key()
    variants: List[str] = key()
    hooks: List[str] = key()


def command(args) -> int:
    """`dcam eval-cam [--json] [k=v ...]`."""
    cfg = to_dict(load_config("eval_cam", args.overrides, schema=EvalCamConfig))
    result = run_eval_cam(cfg, log=log)
    emit(result, args.json, format_table(result))
    return 0
