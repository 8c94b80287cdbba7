"""What a GPU worker hosts: `ProbeActor`, a Ray map_batches callable (also usable directly).

`__init__` loads one model replica; `__call__(batch)` explains every ok row of a decoded batch
and returns one row per input row with a `payload` (pickled per-sample explanation: response,
token maps; consumed by RefineScoreStage). Rows that arrive as errors pass through untouched
(they cost nothing on the GPU and are never lost); a sample that fails inside the probe becomes
an error row with its reason. If a whole batch fails for a reason that is not the sample's
fault, the batch is retried one sample at a time, so one bad sample cannot take others down.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from typing import Callable

import numpy as np
import torch

from dcam.actors.methods import resolve_method
from dcam.actors.probe.explain import explain_batch

PASSTHROUGH_DROP = ()  # pixels travel on: the CPU stage makes thumbnails, so the GPU never does


class ModelLoadError(RuntimeError):
    """The actor's model replica could not be loaded: the whole job fails with this cause."""


class ProbeActor:
    def __init__(self, model_cfg: dict, methods: dict, probe_cfg: dict, testing: dict | None = None,
                 threads_resolver: Callable[[], int | None] | None = None):
        from dcam.actors.models import load_backend

        self.threads = set_probe_threads(probe_cfg.get("threads"), threads_resolver)
        self.load_error = None
        try:
            self.backend = load_backend(model_cfg)
            self.methods = {name: resolve_method(spec, self.backend, _probe_overrides(probe_cfg))
                            for name, spec in methods.items()}
        except Exception as e:  # noqa: BLE001 - re-raised from __call__: Ray would restart a failing
            # constructor forever (the job hangs); a UDF error fails the job at once with this cause
            self.load_error = _describe(e)
        self.seed = int(probe_cfg.get("seed", 0))
        self.testing = testing or {}
        self.batches = 0

    # -- Ray entry point --------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.load_error is not None:
            raise ModelLoadError(f"ProbeActor could not load the model: {self.load_error}")
        self._maybe_die_for_tests()
        n = len(batch["id"])
        out = {k: v for k, v in batch.items() if k not in PASSTHROUGH_DROP}
        payload = np.empty(n, dtype=object)
        status = batch["status"].astype(object)
        error = np.array([_opt_str(v) for v in batch["error"]], dtype=object)
        kind = np.array([_opt_str(v) for v in batch["error_kind"]], dtype=object)
        probe_ms = np.zeros(n, dtype=np.float64)
        ok = [i for i in range(n) if status[i] == "ok"]
        t0 = time.perf_counter()
        results = self._explain(batch, ok)
        per_sample_ms = (time.perf_counter() - t0) * 1000 / max(1, len(ok))
        for i, r in zip(ok, results):
            probe_ms[i] = per_sample_ms
            if isinstance(r, Exception):
                status[i], error[i], kind[i] = "error", _describe(r), getattr(r, "kind", "probe")
            else:
                payload[i] = pickle.dumps(r, protocol=5)
        self.batches += 1
        out.update(status=status, error=error, error_kind=kind, payload=payload, probe_ms=probe_ms,
                   model_id=np.array([self.backend.model_id] * n, dtype=object))
        return out

    # -- internals --------------------------------------------------------------------------
    def _explain(self, batch, idx: list[int]) -> list:
        """Per index: a dict (the sample's explanation) or the Exception that failed it."""
        if not idx:
            return []
        try:
            return self._explain_rows(batch, idx)
        except (RuntimeError, ValueError, MemoryError) as e:  # StructuralStateError and CUDA OOM are RuntimeErrors
            if len(idx) == 1:
                return [e]
            return [r for i in idx for r in self._explain(batch, [i])]  # isolate the failing sample

    def _explain_rows(self, batch, idx: list[int]) -> list:
        images = [_image(batch, i) for i in idx]
        prompts = [str(batch["prompt"][i]) for i in idx]
        responses = [_opt_str(batch["response"][i]) for i in idx] if "response" in batch else None
        words = [_words(batch["explain"][i]) for i in idx] if "explain" in batch else None
        probe_cfgs = {name: pc for name, (pc, _) in self.methods.items()}
        # the CPU stage's refinement configs (same presets, same eos id), so the faithfulness curves are
        # measured on the maps that are written (actors/probe/explain.py)
        refines = {name: rc for name, (_, rc) in self.methods.items()}
        ids = [str(batch["id"][i]) for i in idx]
        with torch.inference_mode(False):
            results = explain_batch(self.backend, images, prompts, probe_cfgs, responses, words, seed=self.seed,
                                    refines=refines, ids=ids)
        return [r.error if r.error is not None else self._payload(r) for r in results]

    def _payload(self, r) -> dict:
        """Plain-data explanation of one sample (what RefineScoreStage consumes)."""
        b = self.backend
        maps = {name: [dict(m.__dict__, word_type=b.word_type(m.token_id), category=b.word_category(m.token_id))
                       for m in ms] for name, ms in r.maps.items()}
        meta = {name: dict(hook=pc.hook, state=pc.state, variant=pc.variant, contrast=pc.contrast)
                for name, (pc, _) in self.methods.items()}
        return dict(prompt=r.prompt, response=r.response, response_ids=r.response_ids, canvas_ids=r.canvas_ids,
                    eos_id=b.eos_id, response_tokens=[b.token_str(t) for t in r.response_ids],  # word -> object alignment
                    response_source=r.response_source, maps=maps, methods=meta)

    def _maybe_die_for_tests(self):
        """Fault injection used only by tests: kill this process once, after N batches."""
        after = self.testing.get("kill_actor_after_batches")
        marker = self.testing.get("kill_marker")
        if after is None or marker is None or self.batches < int(after) or os.path.exists(marker):
            return
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def set_probe_threads(threads, resolver: Callable[[], int | None] | None) -> int:
    """Apply `probe.threads` in this process; returns the torch threads now in effect.
    A number is used as given. "auto" asks `resolver` (pipeline.node_threads.actor_node_threads on
    an existing cluster: the share of the node this actor landed on); the driver already turned
    "auto" into a number on a local cluster. No resolver, or None from it: the process's setting
    (Ray's OMP_NUM_THREADS for a Ray worker, torch's default in-process) stands."""
    if threads == "auto":
        threads = resolver() if resolver is not None else None
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def _probe_overrides(probe_cfg: dict) -> dict:
    keys = ("targets", "per_step", "rows_per_pass", "faithfulness_steps", "faithfulness_sample", "seed")
    return {k: probe_cfg[k] for k in keys if k in probe_cfg and probe_cfg[k] is not None}


def _image(batch, i: int) -> np.ndarray:
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3)


def _opt_str(v) -> str | None:
    """A text cell or None. Ray turns an all-null column into float NaN (np.float32, not a Python
    float), so any non-string, non-bytes cell counts as missing."""
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    return v if isinstance(v, str) and v != "" else None


def _words(v) -> list[str] | None:
    s = _opt_str(v)
    if s is None:
        return None
    return [w for w in (json.loads(s) if s.startswith("[") else s.split(",")) if w.strip()]


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:2000]

