"""The score whose gradient is explained (METHOD.md §2.7): the target's logit contrasted against
its competitors, per attribution row.

The default contrast, `category_mean`, is z_y minus the mean logit of the other words of y's
category; for a word with no category it falls back to z_y - log Σ_{v≠y} exp z_v, the **log-odds**
log(p_y / (1 - p_y)), not the log-probability (`contrast=logprob`). Both are computed in float64
from the float32 logits (the log-sum-exp of a large vocabulary and the difference of two large
numbers keep their digits)."""
from __future__ import annotations

import torch

from dcam.actors.models.protocol import Backend
from dcam.actors.probe.targets import Target


def target_scores(backend: Backend, logits: torch.Tensor, targets: list[Target], contrast: str) -> torch.Tensor:
    """(N,) the score whose gradient is explained, for rows of canvas logits (N, L, V) (float64 for
    `category_mean`, float32 otherwise)."""
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
    if contrast == "parity_fullvocab":  # class-agnostic full-vocabulary sum (METHOD.md §2.7)
        return z.sum(-1)
    if contrast.startswith("word:"):
        other = backend_token_id(backend, contrast.split(":", 1)[1])
        return own - z[:, other]
    return own.double() - _category_competitors(backend, z, y)


def _category_competitors(backend: Backend, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) float64: what `category_mean` subtracts from each row's own logit. The mean logit of the
    other words of the target's category; where the target has no category (or is its category's
    only word), log Σ_{v≠y} exp z_v over the whole vocabulary, which makes the score the log-odds
    log(p_y / (1 - p_y)). Its gradient is the log-probability's divided by (1 - p_y) > 0, so the
    normalised maps equal `logprob`'s, without log p_y's cancellation to 0 when p_y is near 1."""
    out = torch.empty(len(y), dtype=torch.float64, device=z.device)
    for k in range(len(y)):
        cat = backend.word_category(int(y[k]))
        members = [m for m in backend.category_members(cat) if m != int(y[k])] if cat else []
        if members:
            out[k] = z[k, members].double().mean()
        else:
            others = torch.cat([z[k, :int(y[k])], z[k, int(y[k]) + 1:]]).double()
            out[k] = torch.logsumexp(others, 0)
    return out


def backend_token_id(backend: Backend, word: str) -> int:
    tok = getattr(backend, "tok", None)
    if tok is not None and hasattr(tok, "index") and word in tok.index:
        return tok.index[word]
    raise ValueError(f"contrast word {word!r} is not a single token of {backend.model_id}")


def target_probs(logits: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    """(N,) softmax probability of each row's explained token at its position (on the CPU)."""
    n = torch.arange(len(targets), device=logits.device)
    pos = torch.tensor([t.position for t in targets], device=logits.device)
    y = torch.tensor([t.token_id for t in targets], device=logits.device)
    return logits[n, pos].float().softmax(-1)[n, y].cpu()
