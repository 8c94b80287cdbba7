"""The CPU stage after the probe: refine every map, score it, and lay out the output records.

`RefineScoreStage` is a Ray map_batches callable (also usable directly). It keeps one row per
input row and puts the output records (one per explained token x method [x step]) in a pickled
`records` column: an input row's records always travel and are written together, so a crash can
never leave half of a sample's rows on disk. Refinement is batched across the whole Ray batch
(one vectorised call per method and grid shape).
"""
from __future__ import annotations

import io
import json
import pickle
import time

import numpy as np
from PIL import Image

from dcam.actors.methods import refine_config
from dcam.actors.numeric import finite_or_none
from dcam.actors.refine import RefineConfig, refine_batch
from dcam.actors.schema import LOCALISATION_SCORES
from dcam.actors.scores import score_map


class RefineScoreStage:
    def __init__(self, methods: dict, sink_cfg: dict | None = None, config_hash: str = ""):
        self.method_specs = methods
        self.sink = sink_cfg or {}
        self.config_hash = config_hash
        self._refine: dict[tuple[str, int], RefineConfig] = {}

    def refine_for(self, name: str, eos_id: int) -> RefineConfig:
        key = (name, int(eos_id))
        if key not in self._refine:
            self._refine[key] = refine_config(self.method_specs[name], eos_id)
        return self._refine[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        n = len(batch["id"])
        payloads = [pickle.loads(p) if batch["status"][i] == "ok" and isinstance(p, (bytes, bytearray)) else None
                    for i, p in enumerate(batch["payload"])]
        refined = self._refine_all(payloads)
        records = np.empty(n, dtype=object)
        for i in range(n):
            records[i] = pickle.dumps(self._records(batch, i, payloads[i], refined.get(i, {})), protocol=5)
        ms = (time.perf_counter() - t0) * 1000 / max(1, n)
        cpu_s = (time.process_time() - cpu0) / max(1, n)
        keep = ("id", "shard", "row_index", "status", "error", "error_kind", "decode_cpu_s")
        out = {k: batch[k] for k in keep if k in batch}
        out.update(records=records, refine_ms=np.full(n, ms), refine_cpu_s=np.full(n, cpu_s))
        return out

    def _refine_all(self, payloads: list) -> dict[int, dict[str, list[np.ndarray]]]:
        """sample index -> method -> refined maps, one refine_batch call per (method, shape)."""
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, p in enumerate(payloads):
            for name, maps in (p or {}).get("maps", {}).items():
                for k, m in enumerate(maps):
                    groups.setdefault((name, p["eos_id"], m["raw_map"].shape), []).append((i, k))
        out: dict[int, dict[str, dict]] = {}
        for (name, eos, _), where in groups.items():
            raw = np.stack([payloads[i]["maps"][name][k]["raw_map"] for i, k in where])
            ids = [payloads[i]["response_ids"] + [eos] for i, _ in where]
            for (i, k), m in zip(where, refine_batch(raw, self.refine_for(name, eos), token_ids=ids)):
                out.setdefault(i, {}).setdefault(name, {})[k] = m
        return {i: {name: [d[k] for k in sorted(d)] for name, d in per.items()} for i, per in out.items()}

    def _records(self, batch, i: int, payload: dict | None, refined: dict) -> list[dict]:
        base = dict(id=str(batch["id"][i]), shard=str(batch["shard"][i]), row_index=int(batch["row_index"][i]),
                    prompt=_s(batch, "prompt", i), notes=_s(batch, "notes", i) or "", config_hash=self.config_hash,
                    model_id=_s(batch, "model_id", i), probe_ms=float(_f(batch, "probe_ms", i)))
        if payload is None:
            return [dict(base, status="error", error=_s(batch, "error", i), error_kind=_s(batch, "error_kind", i))]
        mask = _mask(batch, i)
        objects = _objects(batch, i)
        thumbs = self._thumbnails(batch, i, mask)
        rows = []
        for name, maps in payload["maps"].items():
            refine_label = self.refine_for(name, payload["eos_id"]).label()
            for m, fine in zip(maps, refined.get(name, [])):
                rows.append(self._record(base, payload, name, refine_label, m, fine, mask, objects))
        if not rows:  # nothing to explain (e.g. no content word): still account for the sample
            rows.append(dict(base, status="ok", response=payload["response"], response_source=payload["response_source"],
                             notes=(base["notes"] + ";no_explained_tokens").lstrip(";")))
        rows[0].update(thumbs)
        return rows

    def _record(self, base, payload, name, refine_label, m, fine, mask, objects) -> dict:
        meta = payload["methods"][name]
        obj = object_for_token(payload["response_ids"], m["position"], m["token"], objects)
        rec = dict(base, status="ok", error=None, error_kind=None, response=payload["response"],
                   response_source=payload["response_source"], token=m["token"], token_index=int(m["position"]),
                   word_type=m.get("word_type"), object_id=None if obj is None else int(obj["id"]),
                   category=None if obj is None else obj.get("category"), method=name, refine=refine_label,
                   hook=meta["hook"], layer=layer_of(meta["hook"]), state=meta["state"],
                   step=None if m["step"] is None else int(m["step"]),
                   map=fine.astype(np.float32).ravel(), map_h=int(fine.shape[0]), map_w=int(fine.shape[1]),
                   raw_map=m["raw_map"].astype(np.float32).ravel(), target_prob=m["target_prob"],
                   deletion_auc=finite_or_none(m["deletion_auc"]), insertion_auc=finite_or_none(m["insertion_auc"]))
        scores = dict.fromkeys(LOCALISATION_SCORES)
        if mask is not None and obj is not None:
            cell = mask.shape[0] / fine.shape[0]
            scores.update({k: finite_or_none(v) for k, v in score_map(fine, mask, int(obj["id"]), cell).items() if k in LOCALISATION_SCORES})
        rec.update(scores)
        return rec

    def _thumbnails(self, batch, i: int, mask) -> dict:
        size = int(self.sink.get("thumbnail_size", 128))
        if not self.sink.get("thumbnails", True) or size <= 0 or "pixels" not in batch:
            return {}
        h, w = int(batch["height"][i]), int(batch["width"][i])
        img = Image.fromarray(np.frombuffer(batch["pixels"][i], np.uint8).reshape(h, w, 3))
        img.thumbnail((size, size), Image.BILINEAR)
        out = dict(thumbnail=_png(img))
        if mask is not None:
            m = Image.fromarray(mask.astype(np.uint16).clip(0, 255).astype(np.uint8)).resize(img.size, Image.NEAREST)
            out["mask_thumbnail"] = _png(m)
        return out


def object_for_token(response_ids: list[int], position: int, token: str, objects: list[dict] | None) -> dict | None:
    """The object a response word names: among objects whose `words` contain it, the k-th for
    the k-th occurrence of the word in the response (objects are listed in mention order, as
    dcam synth and COCO-style captions with one phrase per object do). None when no object
    lists the word, or when there are fewer candidates than occurrences (ambiguous)."""
    if not objects:
        return None
    word = token.strip().lower()
    candidates = [o for o in objects if word in [str(w).lower() for w in o.get("words", [])]]
    rank = sum(1 for p in range(position) if p < len(response_ids) and response_ids[p] == response_ids[position])
    return candidates[rank] if rank < len(candidates) else None


def layer_of(hook: str) -> int | None:
    for part in hook.split("."):
        if part.isdigit():
            return int(part)
    return None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _s(batch, key, i):
    if key not in batch:
        return None
    v = batch[key][i]
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    return v if isinstance(v, str) else None  # all-null columns arrive as float NaN


def _f(batch, key, i) -> float:
    return float(batch[key][i]) if key in batch else float("nan")


def _mask(batch, i: int):
    if "mask_pixels" not in batch or not isinstance(batch["mask_pixels"][i], (bytes, bytearray)):
        return None
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["mask_pixels"][i], dtype="<u2").reshape(h, w)


def _objects(batch, i: int) -> list[dict] | None:
    s = _s(batch, "objects", i)
    return json.loads(s) if s else None
