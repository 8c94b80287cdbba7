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
from dcam.actors.refine import RefineConfig, refine_explained
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
            canvases = [payloads[i]["canvas_ids"] for i, _ in where]
            lengths = [len(payloads[i]["response_ids"]) for i, _ in where]
            for (i, k), m in zip(where, refine_explained(raw, self.refine_for(name, eos), canvases, lengths)):
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
        named = word_objects(response_tokens(payload), objects)
        rows = []
        for name, maps in payload["maps"].items():
            refine_label = self.refine_for(name, payload["eos_id"]).label()
            for m, fine in zip(maps, refined.get(name, [])):
                rows.append(self._record(base, payload, name, refine_label, m, fine, mask, named))
        if not rows:  # nothing to explain (e.g. no content word): still account for the sample
            rows.append(dict(base, status="ok", response=payload["response"], response_source=payload["response_source"],
                             notes=(base["notes"] + ";no_explained_tokens").lstrip(";")))
        rows[0].update(thumbs)
        return rows

    def _record(self, base, payload, name, refine_label, m, fine, mask, named: dict) -> dict:
        """One output row; named: response position -> object (word_objects)."""
        meta = payload["methods"][name]
        obj = named.get(int(m["position"]))
        if int(m["position"]) in named and obj is None:  # a wrong word: recorded, scored against no object
            base = dict(base, notes=(base["notes"] + ";" + WRONG_WORD).lstrip(";"))
        rec = dict(base, status="ok", error=None, error_kind=None, response=payload["response"],
                   response_source=payload["response_source"], token=m["token"], token_index=int(m["position"]),
                   word_type=m.get("word_type"), object_id=None if obj is None else int(obj["id"]),
                   category=None if obj is None else obj.get("category"), method=name, refine=refine_label,
                   hook=meta["hook"], layer=layer_of(meta["hook"]), state=m.get("state") or meta["state"],
                   step=None if m["step"] is None else int(m["step"]),
                   map=fine.astype(np.float32).ravel(), map_h=int(fine.shape[0]), map_w=int(fine.shape[1]),
                   raw_map=m["raw_map"].astype(np.float32).ravel(), target_prob=m["target_prob"],
                   deletion_auc=finite_or_none(m["deletion_auc"]), insertion_auc=finite_or_none(m["insertion_auc"]),
                   blind_prob=finite_or_none(m.get("blind_prob")), image_reliance=finite_or_none(m.get("image_reliance")),
                   faithfulness_sampled=m.get("faithfulness_sampled"))
        scores = dict.fromkeys(LOCALISATION_SCORES)
        if mask is not None and obj is not None:  # tolerant pointing radius: scores.token_cell_px / 2
            scores.update({k: finite_or_none(v) for k, v in score_map(fine, mask, int(obj["id"])).items() if k in LOCALISATION_SCORES})
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


WRONG_WORD = "wrong_word"  # note on a row whose word its aligned object does not list (scored against none)


def normalised_word(token: str) -> str:
    """A token as an object word: lower case, surrounding whitespace and punctuation removed."""
    return token.strip().strip(".,;:!?\"'()[]").lower()


def response_phrases(tokens: list[str], objects: list[dict]) -> list[list[int]]:
    """The object phrases of a response: maximal runs of consecutive tokens each of which is a
    word some object lists (its `words`); any other token (articles, "and", punctuation, words
    no object lists) ends a phrase. "a green square and a blue square" -> [[1, 2], [5, 6]]."""
    vocabulary = {str(w).lower() for o in objects for w in o.get("words", [])}
    phrases: list[list[int]] = []
    current: list[int] = []
    for p, t in enumerate(tokens):
        if normalised_word(t) in vocabulary:
            current.append(p)
        elif current:
            phrases.append(current)
            current = []
    return phrases + [current] if current else phrases


def phrase_objects(tokens: list[str], objects: list[dict]) -> list[tuple[list[int], dict | None]]:
    """(token positions, aligned object or None) of every object phrase (METHOD.md §5.2).

    A phrase *names* an object when the object's `words` contain every word of the phrase. Objects
    are listed in caption order (dcam synth: the caption's order). In turn:
    1. the k-th phrase gets the k-th object when it names it (caption order);
    2. each phrase still without one, in response order, gets the first object (in list order) that
       it names and no phrase has got (a phrase out of caption order, or a source such as COCO whose
       objects are in annotation order);
    3. a phrase still without one gets the k-th object by position if no phrase has got it (its
       words that object does not list are wrong words, see word_objects); else none.
    """
    phrases = response_phrases(tokens, objects)
    words = [{str(w).lower() for w in o.get("words", [])} for o in objects]
    names = [[k for k, ws in enumerate(words) if {normalised_word(tokens[p]) for p in ph} <= ws] for ph in phrases]
    got: list[int | None] = [j if j in names[j] else None for j in range(len(phrases))]
    taken = {k for k in got if k is not None}
    for j, candidates in enumerate(names):
        if got[j] is None:
            got[j] = next((k for k in candidates if k not in taken), None)
            taken |= {got[j]} - {None}
    for j in range(len(phrases)):
        if got[j] is None and j < len(objects) and j not in taken:
            got[j] = j
            taken.add(j)
    return [(ph, None if k is None else objects[k]) for ph, k in zip(phrases, got)]


def word_objects(tokens: list[str], objects: list[dict] | None) -> dict[int, dict | None]:
    """Response position -> the object its word names, for every token inside an object phrase: the
    phrase's aligned object when that object lists the word, else None (a wrong word: "square" in the
    place of a triangle). Positions outside every phrase are absent."""
    if not objects:
        return {}
    out: dict[int, dict | None] = {}
    for ph, obj in phrase_objects(tokens, objects):
        listed = set() if obj is None else {str(w).lower() for w in obj.get("words", [])}
        out.update({p: obj if normalised_word(tokens[p]) in listed else None for p in ph})
    return out


def response_tokens(payload: dict) -> list[str]:
    """The response's token strings. Payloads from ProbeActor carry them all; otherwise only the
    explained tokens are known and every other position counts as a phrase boundary."""
    if payload.get("response_tokens") is not None:
        return list(payload["response_tokens"])
    tokens = [""] * len(payload["response_ids"])
    for maps in payload["maps"].values():
        for m in maps:
            if 0 <= int(m["position"]) < len(tokens):
                tokens[int(m["position"])] = m["token"]
    return tokens


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
