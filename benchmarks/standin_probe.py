"""A stand-in for the ProbeActor, for capacity planning by simulation (`dcam bench-scale`, the
100k-image benchmark): no model. Each batch is held for a configured accelerator time per image
(time.sleep: the actor needs no CPU while it "computes", as a GPU actor mostly waits on its GPU),
then every ok row gets a payload in exactly the format `dcam.actors.probe_actor.ProbeActor` emits
(a test compares the two), with deterministic maps of a configured grid size for a configured
number of words per image. Everything after it (refine, score, Parquet sink, compaction,
manifest) is the real job, so the CPU stages cost what they cost in production for that grid and
that many words.

What it does not simulate: the probe's own host-side CPU work (tokenising, the CPU parts of a
real model step) and host<->GPU transfers; both add to the CPU a GPU worker needs.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import time

import numpy as np

STAND_IN_MODEL_ID = "stand-in-probe (simulation, no model)"
EOS_ID = 1
STAND_IN_METHOD_META = dict(hook="stand_in.layers.0", state="stand_in", variant="stand_in", contrast="stand_in")


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def token_id_of(word: str) -> int:
    """A stable id per word (>= 2: 0 is padding, 1 the stand-in's EOS)."""
    return 2 + _seed("word", word) % 50_000


def stand_in_map(sample_id: str, position: int, grid: int) -> np.ndarray:
    """Deterministic (grid, grid) float32 map in [0, 1]: a Gaussian blob plus noise, placed by a
    hash of (sample id, word position), so reruns and resumed runs write identical maps."""
    rng = np.random.default_rng(_seed(sample_id, position))
    cy, cx = rng.uniform(0, grid, 2)
    sharp = rng.uniform(1.0, grid / 4)
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sharp ** 2)) + rng.uniform(0, 0.25, (grid, grid))
    return (m / m.max()).astype(np.float32)


def stand_in_words(response: str | None, words: int) -> list[str]:
    """`words` words to explain: the sample's given response, cycled (a fixed filler without one)."""
    base = [w for w in (response or "").split() if w] or ["object"]
    return [base[k % len(base)] for k in range(words)]


class StandInProbe:
    """Ray map_batches callable with ProbeActor's input and output columns (see module docstring)."""

    def __init__(self, methods: dict, gpu_s_per_image: float, grid: int = 27, words: int = 10,
                 events_dir: str | None = None):
        self.method_names = list(methods)
        self.gpu_s_per_image = float(gpu_s_per_image)
        self.grid, self.words = int(grid), int(words)
        # One line per batch (wall-clock end time, images) in a file of this actor's own, so the
        # benchmark can measure the steady rate from the probe's side (read_probe_events).
        self.events = None if events_dir is None else open(f"{events_dir}/{os.getpid()}-{id(self)}.tsv", "a")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        status = batch["status"].astype(object)
        ok = [i for i in range(n) if status[i] == "ok"]
        t0 = time.perf_counter()
        time.sleep(self.gpu_s_per_image * len(ok))  # the accelerator's time for this batch
        payload = np.empty(n, dtype=object)
        for i in ok:
            payload[i] = pickle.dumps(self.payload(batch, i), protocol=5)
        if self.events is not None:
            self.events.write(f"{time.time():.6f}\t{len(ok)}\n")
            self.events.flush()
        probe_ms = np.zeros(n, dtype=np.float64)
        probe_ms[ok] = (time.perf_counter() - t0) * 1000 / max(1, len(ok))
        out = dict(batch)
        out.update(status=status, error=batch["error"].astype(object), error_kind=batch["error_kind"].astype(object),
                   payload=payload, probe_ms=probe_ms, model_id=np.array([STAND_IN_MODEL_ID] * n, dtype=object))
        return out

    def payload(self, batch, i: int) -> dict:
        """One sample's explanation, in ProbeActor._payload's format."""
        sid = str(batch["id"][i])
        response = batch["response"][i] if "response" in batch else None
        words = stand_in_words(response if isinstance(response, str) else None, self.words)
        ids = [token_id_of(w) for w in words]
        maps = [dict(sample=0, position=k, token_id=ids[k], token=w, step=None,
                     raw_map=stand_in_map(sid, k, self.grid), target_prob=0.5, deletion_auc=0.3, insertion_auc=0.6,
                     faithfulness_sampled=True, state=STAND_IN_METHOD_META["state"], blind_prob=0.1,
                     image_reliance=0.4, word_type="content", category=None) for k, w in enumerate(words)]
        return dict(prompt=str(batch["prompt"][i]), response=" ".join(words), response_ids=ids,
                    canvas_ids=[*ids, EOS_ID], response_tokens=list(words), eos_id=EOS_ID,
                    response_source="stand_in", maps={name: maps for name in self.method_names},
                    methods={name: dict(STAND_IN_METHOD_META) for name in self.method_names})


def read_probe_events(events_dir: str) -> list[tuple[float, int]]:
    """Every stand-in batch of a run: (wall-clock end time, images), sorted by time."""
    out = []
    for name in os.listdir(events_dir):
        with open(os.path.join(events_dir, name)) as f:
            out += [(float(t), int(n)) for t, n in (line.split("\t") for line in f if line.strip())]
    return sorted(out)


def steady_window(events: list[tuple[float, int]], lo: float = 0.1, hi: float = 0.9) -> tuple[float, float, int]:
    """(t_lo, t_hi, images probed in between): from the batch that brought the probed count past
    `lo` of the total to the one past `hi`, leaving out actor start-up and the drain at the end."""
    total = sum(n for _, n in events)
    done, t_lo, n_lo = 0, None, 0
    for t, n in events:
        done += n
        if t_lo is None and done >= lo * total:
            t_lo, n_lo = t, done
        if done >= hi * total:
            return t_lo, t, done - n_lo
    raise ValueError("no probe events")
