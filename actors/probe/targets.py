"""What is explained, and in which denoising state: the probe's configuration and its attribution rows.

For a batch the probe obtains the response (generated, or a given response replayed through the
model's own confidence schedule, so a given response has a trajectory too), picks the explained
canvas positions (every content word by default) and builds one `Target` per (sample, position
[, step]) with the canvas state it is explained in (METHOD.md §2):
`trajectory` (the canvas just before that token was committed: it and everything committed later
are still MASK), `remask_target` (final canvas, target re-masked), `teacher_forced` (final canvas;
the authors' code) or `last_step` (the canvas of the final denoising step; their Grad-CAM).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dcam.actors.models.protocol import Backend, Generation, PreparedBatch, SampleError

STATES = ("trajectory", "remask_target", "teacher_forced", "last_step")
CONTRASTS = ("category_mean", "logprob", "logit", "max_logit", "parity_fullvocab")  # or "word:<w>"


@dataclass
class ProbeConfig:
    variant: str = "grad_norm"
    hook: str = "blocks.1.out"
    state: str = "trajectory"
    contrast: str = "category_mean"
    targets: str = "content"  # content | all | index:<k>
    per_step: bool = False  # also one map per denoising step (trajectory maps)
    rows_per_pass: int = 64
    faithfulness_steps: int = 8  # 0 disables deletion/insertion
    faithfulness_sample: float = 1.0  # fraction of explained words with curves (deterministic sample)
    seed: int = 0

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"probe.state must be one of {STATES}, got {self.state!r}")
        if self.contrast not in CONTRASTS and not self.contrast.startswith("word:"):
            raise ValueError(f"probe.contrast must be one of {CONTRASTS} or 'word:<w>', got {self.contrast!r}")
        if not 0 < self.faithfulness_sample <= 1:
            raise ValueError(f"probe.faithfulness_sample must be in (0, 1], got {self.faithfulness_sample!r}")


# The state label of a `per_step` trajectory row whose step comes after the token's commit step:
# its canvas already shows the explained token, so it is not the state the token was decided in.
COMMITTED_LABEL = "trajectory_committed"


@dataclass
class Target:
    """One attribution row: sample `sample` (index in the prepared batch), canvas position
    `position`, the canvas state of step `step` (None for teacher_forced), and `state`, the label
    written to the output row (the method's state, or COMMITTED_LABEL, see state_label)."""
    sample: int
    position: int
    token_id: int
    step: int | None
    canvas: torch.Tensor = field(repr=False)
    state: str | None = None


def obtain_response(backend: Backend, batch: PreparedBatch, seed: int) -> Generation:
    """Generate where no response is given, replay the given ones; merged per sample."""
    given = [g is not None for g in batch.given_ids]
    if all(given):
        return backend.forced_trajectory(batch)
    gen = backend.generate(batch, seed=seed)
    if any(given):
        forced = backend.forced_trajectory(_only(batch, given))
        idx = torch.tensor([i for i, g in enumerate(given) if g])
        gen.ids[idx], gen.commit_step[idx] = forced.ids, forced.commit_step
        if gen.final_step is not None and forced.final_step is not None:
            gen.final_step[idx] = forced.final_step
        gen.source = "mixed"
    return gen


def _only(batch: PreparedBatch, keep: list[bool]) -> PreparedBatch:
    idx = [i for i, k in enumerate(keep) if k]
    t = torch.tensor(idx, dtype=torch.long)
    return PreparedBatch(inputs={k: v[t.to(v.device)] for k, v in batch.inputs.items()},
                         spans=[batch.spans[i] for i in idx], prompts=[batch.prompts[i] for i in idx],
                         given_ids=[batch.given_ids[i] for i in idx],
                         image_sizes=[batch.image_sizes[i] for i in idx],
                         source_index=[batch.source_index[i] for i in idx] if batch.source_index else idx)


def end_ids(backend: Backend):
    return tuple(getattr(backend, "eos_ids", ()) or ()) or (backend.eos_id,)


def answer_length(ids: torch.Tensor, eos_id) -> int:
    """Tokens before the first end id (eos_id: one id or a tuple of ids)."""
    eos = torch.as_tensor(list(eos_id) if isinstance(eos_id, (tuple, list)) else [eos_id], device=ids.device)
    hits = torch.isin(ids, eos).nonzero()
    return int(hits[0]) if len(hits) else int(ids.numel())


def select_positions(backend: Backend, ids: torch.Tensor, how: str, words: list[str] | None = None) -> list[int]:
    """Canvas positions to explain. `words` (explicit) wins over `how`; a word that is not in the
    response raises SampleError('target')."""
    n = answer_length(ids, end_ids(backend))
    if words:
        strs = [backend.token_str(int(i)).strip().lower() for i in ids[:n]]
        missing = [w for w in words if w.lower() not in strs]
        if missing:
            raise SampleError("target", f"explained word(s) {missing} not in the response")
        return [p for p, s in enumerate(strs) if s in {w.lower() for w in words}]
    if how == "all":
        return list(range(n))
    if how.startswith("index:"):
        k = int(how.split(":", 1)[1])
        return [min(k, n - 1)] if n else []
    if how != "content":
        raise ValueError(f"probe.targets must be content, all or index:<k>, got {how!r}")
    return [p for p in range(n) if backend.is_content(int(ids[p]))]


def build_targets(backend: Backend, gen: Generation, cfg: ProbeConfig, positions: dict[int, list[int]]) -> list[Target]:
    """One Target per (sample, position[, step]) with its canvas state."""
    out = []
    for i, plist in positions.items():
        for p in plist:
            commit = int(gen.commit_step[i, p])
            steps = range(gen.n_steps) if cfg.per_step else [commit]
            for s in steps:
                out.append(Target(i, p, int(gen.ids[i, p]), s if cfg.state != "teacher_forced" else None,
                                  _canvas(backend, gen, i, p, s, cfg.state), state_label(cfg.state, s, commit)))
    return out


def state_label(state: str, step: int, commit: int) -> str:
    """The output row's `state`: the method's state, except a `trajectory` row of a step after the
    token's commit step (only with per_step), whose canvas `state_before(step)` already holds the
    token: `trajectory_committed`, so it is never read as the state the token was decided in."""
    return COMMITTED_LABEL if state == "trajectory" and step > commit else state


def _canvas(backend: Backend, gen: Generation, i: int, p: int, step: int, state: str) -> torch.Tensor:
    row = torch.tensor([i])
    if state == "trajectory":
        return gen.state_before(row, torch.tensor([step]), backend.mask_id)[0]
    if state == "last_step":
        fs = gen.final_step
        last = int(fs[i]) if fs is not None else gen.n_steps - 1
        return gen.state_before(row, torch.tensor([last]), backend.mask_id)[0]
    canvas = gen.ids[i].clone()
    if state == "remask_target":
        canvas[p] = backend.mask_id
    return canvas
