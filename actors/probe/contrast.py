"""The score whose gradient is explained (METHOD.md §2.7): the target's logit contrasted against
its competitors, per attribution row."""
from __future__ import annotations

import torch

from dcam.actors.models.protocol import Backend
from dcam.actors.probe.targets import Target


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
    if contrast == "parity_fullvocab":  # class-agnostic full-vocabulary sum (METHOD.md §2.7)
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


def target_probs(logits: torch.Tensor, targets: list[Target]) -> torch.Tensor:
    """(N,) softmax probability of each row's explained token at its position (on the CPU)."""
    n = torch.arange(len(targets), device=logits.device)
    pos = torch.tensor([t.position for t in targets], device=logits.device)
    y = torch.tensor([t.token_id for t in targets], device=logits.device)
    return logits[n, pos].float().softmax(-1)[n, y].cpu()
