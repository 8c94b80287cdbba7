"""The Diffusion-CAM probe: explain response tokens of a batch in the denoising state.

For a batch of samples:
1. obtain the response: generate it, or replay a given response through the model's own
   confidence schedule (so a given response also has a trajectory);
2. pick the explained tokens (every content word by default) and build, per token, the
   attribution state: `trajectory` (the canvas just before that token was committed: it and
   everything committed later are still MASK), `remask_target` (final canvas, target re-masked),
   `teacher_forced` (final canvas; reference parity) or `last_step` (the canvas of the final
   denoising step; the authors' Grad-CAM baseline);
3. one grad-enabled forward over frozen weights for all (sample, token) rows together, the
   class-specific contrastive score per row, `torch.autograd.grad` w.r.t. the hooked
   activation only (rows are independent, so the gradient of the sum is every row's gradient);
4. slice each sample's image grid from the hooked stream (separator columns dropped), after
   checking the structurally-valid-state rule; form the map with the chosen variant.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.cams import get_variant, normalise_maps
from actors.models.protocol import Backend, Generation, PreparedBatch, SampleError, StructuralStateError

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
    seed: int = 0

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"probe.state must be one of {STATES}, got {self.state!r}")
        if self.contrast not in CONTRASTS and not self.contrast.startswith("word:"):
            raise ValueError(f"probe.contrast must be one of {CONTRASTS} or 'word:<w>', got {self.contrast!r}")


@dataclass
class Target:
    """One attribution row: sample `sample` (index in the prepared batch), canvas position
    `position`, state `state` of step `step` (None for teacher_forced)."""
    sample: int
    position: int
    token_id: int
    step: int | None
    canvas: torch.Tensor = field(repr=False)


@dataclass
class TokenMap:
    sample: int
    position: int
    token_id: int
    token: str
    step: int | None
    raw_map: np.ndarray  # (h, w) float32 in [0, 1]
    target_prob: float
    deletion_auc: float = float("nan")
    insertion_auc: float = float("nan")


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
                                  _canvas(backend, gen, i, p, s, cfg.state)))
    return out


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


def target_scores(backend: Backend, logits: torch.Tensor, targets: list[Target], contrast: str) -> torch.Tensor:
    """(N,) the score whose gradient is explained, for rows of canvas logits (N, L, V)."""
    n = torch.arange(len(targets), device=logits.device)
    pos = torch.tensor([t.position for t in targets], device=logits.device)
    y = torch.tensor([t.token_id for t in targets], device=logits.device)
    z = logits[n, pos].float()  # (N, V)
    own = z[n, y]
    if contrast == "logit":
        return own
    if contrast == "max_logit":
        return z.max(-1).values
    if contrast == "logprob":
        return z.log_softmax(-1)[n, y]
    if contrast == "parity_fullvocab":  # class-agnostic full-vocabulary sum (reference §2.5)
        return z.sum(-1)
    if contrast.startswith("word:"):
        other = backend_token_id(backend, contrast.split(":", 1)[1])
        return own - z[:, other]
    return own - _category_mean(backend, z, y)


def _category_mean(backend: Backend, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean logit of the other words of the target's category; log-sum-exp of all other words
    where the target has no category (the log-prob contrast)."""
    out = torch.empty_like(z[:, 0])
    for k in range(len(y)):
        cat = backend.word_category(int(y[k]))
        members = [m for m in backend.category_members(cat) if m != int(y[k])] if cat else []
        if members:
            out[k] = z[k, members].mean()
        else:
            others = torch.cat([z[k, :int(y[k])], z[k, int(y[k]) + 1:]])
            out[k] = torch.logsumexp(others, 0)
    return out


def backend_token_id(backend: Backend, word: str) -> int:
    tok = getattr(backend, "tok", None)
    if tok is not None and hasattr(tok, "index") and word in tok.index:
        return tok.index[word]
    raise ValueError(f"contrast word {word!r} is not a single token of {backend.model_id}")


def slice_grid(act: torch.Tensor, batch: PreparedBatch, rows: torch.Tensor, hook: str, stream: str,
               steps: list[int | None]) -> list[torch.Tensor]:
    """Per row, the (h, w, D) grid of the hooked activation. Raises StructuralStateError when the
    hooked state does not hold the full image span (never substitutes defaults)."""
    out = []
    for k, i in enumerate(rows.tolist()):
        span = batch.spans[i]
        if span.stream != stream or act.shape[1] < span.end:
            raise StructuralStateError(
                f"hook {hook!r} (stream {stream!r}, sequence length {act.shape[1]}) at denoising step {steps[k]} does not "
                f"hold the image span (stream {span.stream!r}, positions up to {span.end}): not a structurally valid state")
        pos = torch.as_tensor(span.positions(), device=act.device)
        out.append(act[k, pos])
    return out


def attribution_pass(backend: Backend, batch: PreparedBatch, targets: list[Target], cfg: ProbeConfig) -> list[TokenMap]:
    """Maps for all targets, `cfg.rows_per_pass` rows per forward/backward."""
    out: list[TokenMap] = []
    for lo in range(0, len(targets), cfg.rows_per_pass):
        out += _attribution_chunk(backend, batch, targets[lo:lo + cfg.rows_per_pass], cfg)
    return out


def _attribution_chunk(backend: Backend, batch: PreparedBatch, targets: list[Target], cfg: ProbeConfig) -> list[TokenMap]:
    variant = get_variant(cfg.variant)
    rows = torch.tensor([t.sample for t in targets], device=backend.device)
    canvas = torch.stack([t.canvas for t in targets]).to(backend.device)
    stream = backend.hook_stream(cfg.hook)
    with torch.enable_grad():
        out = backend.attribution_forward(batch, rows, canvas, [cfg.hook])
        act = out.activations[cfg.hook]
        scores = target_scores(backend, out.logits, targets, cfg.contrast)
        grad = torch.autograd.grad(scores.sum(), act)[0]
    probs = _target_probs(out.logits.detach(), targets)
    A = slice_grid(act.detach().float(), batch, rows, cfg.hook, stream, [t.step for t in targets])
    G = slice_grid(grad.float(), batch, rows, cfg.hook, stream, [t.step for t in targets])
    if len({a.shape for a in A}) == 1:  # one grid size: form all maps in one call
        maps = list(normalise_maps(variant.form(torch.stack(A), torch.stack(G))))
    else:
        maps = [normalise_maps(variant.form(a[None], g[None]))[0] for a, g in zip(A, G)]
    del out, act, grad, scores
    return [TokenMap(t.sample, t.position, t.token_id, backend.token_str(t.token_id), t.step,
                     m.cpu().numpy().astype(np.float32), float(p)) for t, m, p in zip(targets, maps, probs)]


def _target_probs(logits: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    n = torch.arange(len(targets), device=logits.device)
    pos = torch.tensor([t.position for t in targets], device=logits.device)
    y = torch.tensor([t.token_id for t in targets], device=logits.device)
    return logits[n, pos].float().softmax(-1)[n, y].cpu()


@dataclass
class SampleExplanation:
    """Everything the probe says about one input sample."""
    index: int  # input index
    prompt: str = ""
    response: str = ""
    response_ids: list[int] = field(default_factory=list)
    response_source: str = ""
    maps: dict[str, list[TokenMap]] = field(default_factory=dict)  # method name -> token maps
    error: SampleError | None = None


def explain_batch(backend: Backend, images: list[np.ndarray], prompts: list[str], methods: dict[str, ProbeConfig],
                  responses: list[str | None] | None = None, words: list[list[str] | None] | None = None,
                  seed: int = 0, timings: dict[str, float] | None = None) -> list[SampleExplanation]:
    """Explain a batch with every method in `methods` (shared generation). One result per input,
    in input order; samples that cannot be prepared or targeted carry `error`.
    timings: if given, seconds spent per phase (response, attribution, faithfulness) are added."""
    from actors.baselines import tam_pass

    results = [SampleExplanation(index=i) for i in range(len(images))]
    batch, errors = backend.prepare(images, prompts, responses)
    for i, e in errors.items():
        results[i].error = e
    if batch.size == 0:
        return results
    with _phase(timings, "response"):
        gen = obtain_response(backend, batch, seed)
    positions = _positions(backend, batch, gen, next(iter(methods.values())).targets, words, results)
    for name, cfg in methods.items():
        targets = build_targets(backend, gen, cfg, positions)
        with _phase(timings, "attribution"):
            maps = (tam_pass(backend, batch, targets, cfg) if cfg.variant == "tam"
                    else attribution_pass(backend, batch, targets, cfg))
        if cfg.faithfulness_steps:
            with _phase(timings, "faithfulness"):
                _add_faithfulness(backend, batch, targets, maps, cfg)
        for t, m in zip(targets, maps):
            results[batch.source_index[t.sample]].maps.setdefault(name, []).append(m)
    for j, i in enumerate(batch.source_index):
        r = results[i]
        r.prompt, r.response_source = batch.prompts[j], ("given" if batch.given_ids[j] is not None else "generated")
        n = answer_length(gen.ids[j], end_ids(backend))
        r.response_ids = gen.ids[j, :n].tolist()
        r.response = backend.decode(r.response_ids)
    return results


@contextmanager
def _phase(timings: dict[str, float] | None, name: str):
    """Adds the block's wall seconds to timings[name] (no-op when timings is None). On a GPU the
    queue is drained at both ends, so kernels still running are not billed to the next phase."""
    if timings is None:
        yield
        return
    _sync_cuda()
    t0 = time.perf_counter()
    yield
    _sync_cuda()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _positions(backend, batch, gen, how, words, results) -> dict[int, list[int]]:
    out = {}
    for j, i in enumerate(batch.source_index):
        try:
            out[j] = select_positions(backend, gen.ids[j], how, words[i] if words else None)
        except SampleError as e:
            results[i].error = e
    return out


def _add_faithfulness(backend, batch, targets: list[Target], maps: list[TokenMap], cfg: ProbeConfig) -> None:
    from actors.faithfulness import faithfulness

    by_shape: dict[tuple, list[int]] = {}
    for k, m in enumerate(maps):
        by_shape.setdefault(m.raw_map.shape, []).append(k)
    for idx in by_shape.values():
        sel = [targets[k] for k in idx]
        dele, ins = faithfulness(
            backend, batch, torch.tensor([t.sample for t in sel], device=backend.device),
            torch.stack([t.canvas for t in sel]).to(backend.device),
            torch.tensor([t.position for t in sel]), torch.tensor([t.token_id for t in sel]),
            np.stack([maps[k].raw_map for k in idx]), cfg.faithfulness_steps)
        for j, k in enumerate(idx):
            maps[k].deletion_auc, maps[k].insertion_auc = float(dele[j]), float(ins[j])
