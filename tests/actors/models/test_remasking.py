"""Ties in the commit order (issue 13, defect 6): every backend's denoising loop breaks exact ties in
confidence (or, on DiffusionGemma, in entropy) by the lowest position, never by torch.topk's or an
unstable sort's device-dependent order. The selector is checked on random inputs with planted ties
against plain Python; each backend's loop on planted logits whose confidences tie exactly (identical
rows, and distinct logits that saturate to probability 1.0) against a plain-Python replay."""
import math
import types

import numpy as np
import pytest
import torch
from llada_testing import lavida_config, llada_v_config, reference_image, write_checkpoint

from dcam.actors import scenes
from dcam.actors.models import load_backend
from dcam.actors.models.diffusion_gemma import DiffusionGemmaBackend
from dcam.actors.models.lavida import transfer_counts
from dcam.actors.models.llada_v import uniform_counts
from dcam.actors.models.remasking import order_lowest_first, top_k_lowest_first
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.models.tiny_dmllm import step_counts


def _reference_top_k(conf: list[float], k: int) -> set[int]:
    """Plain Python: the k highest finite confidences, equal ones by increasing position."""
    open_ = [p for p, c in enumerate(conf) if c != -math.inf]
    return set(sorted(open_, key=lambda p: (-conf[p], p))[:k])


def _planted(rng, B, L, levels=4, closed=0.2) -> torch.Tensor:
    """(B, L) confidences drawn from a few levels (so ties abound), some positions closed (-inf)."""
    vals = torch.tensor(rng.choice(np.linspace(0.1, 1.0, levels), size=(B, L)), dtype=torch.float32)
    return vals.masked_fill(torch.tensor(rng.random((B, L)) < closed), float("-inf"))


@pytest.mark.parametrize("L", [5, 12, 64, 300])
def test_top_k_lowest_first_equals_plain_python_with_planted_ties(L):
    rng = np.random.default_rng(L)
    for _ in range(20):
        conf = _planted(rng, 3, L)
        k = torch.tensor(rng.integers(0, L + 2, size=3))  # up to more than the open positions
        got = top_k_lowest_first(conf, k)
        for b in range(3):
            want = _reference_top_k(conf[b].tolist(), int(k[b]))
            assert set(got[b].nonzero()[:, 0].tolist()) == want
    same_k = top_k_lowest_first(conf, 3)
    assert torch.equal(same_k, top_k_lowest_first(conf, torch.tensor([3, 3, 3])))


def test_order_lowest_first_keeps_position_order_among_equal_scores():
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.integers(0, 5, size=(4, 257)), dtype=torch.float32)
    for descending in (False, True):
        got = order_lowest_first(scores, descending)
        for b in range(4):
            s = scores[b].tolist()
            want = sorted(range(len(s)), key=lambda p: ((-s[p]) if descending else s[p], p))
            assert got[b].tolist() == want


def test_all_equal_confidences_commit_the_lowest_positions():
    conf = torch.ones(2, 64)
    assert top_k_lowest_first(conf, 5)[0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4]


# -- backends: planted logits, a plain-Python replay of the loop ----------------------------------
def _planted_logits(B: int, L: int, V: int, token: int, big: tuple[float, ...]) -> torch.Tensor:
    """(B, L, V) logits constant over passes: position p proposes `token` with logit a_p, every other
    id 0. a_p is one of `big` (probability saturates to exactly 1.0) or 2.0 / 3.0 in identical rows
    (exactly equal probabilities), so most positions tie."""
    rng = np.random.default_rng(7)
    choices = (*big, 2.0, 3.0)
    logits = torch.zeros(B, L, V)
    logits[:, :, token] = torch.tensor(rng.choice(choices, size=(B, L)), dtype=torch.float32)
    return logits


def _replay(conf: list[float], block: int, counts: list[int]) -> list[int]:
    """Commit step per position of low-confidence remasking with fixed confidences: per block, per
    pass, the k most confident masked positions of the block, ties by lowest position."""
    commit, s = [-1] * len(conf), 0
    for lo in range(0, len(conf), block):
        for k in counts:
            open_ = [p for p in range(lo, lo + block) if commit[p] < 0]
            if not open_:
                continue
            for p in sorted(open_, key=lambda p: (-conf[p], p))[:k]:
                commit[p] = s
            s += 1
    return commit


def _assert_ties_planted(conf: torch.Tensor) -> None:
    for row in conf.tolist():
        assert len(set(row)) < len(row) / 2  # many exact ties, else the test proves nothing


@pytest.mark.parametrize("block_length,steps", [(None, 12), (6, 4)])
def test_tiny_commit_order_breaks_planted_ties_by_lowest_position(block_length, steps):
    backend = TinyBackend.load()
    backend.block_length, backend.gen_steps = block_length, steps
    items = scenes.make_scenes(11, 0, 2, scenes.SceneConfig(size=backend.model.config.image_size))
    batch, _ = backend.prepare([s.image for s in items], [s.prompt for s in items])
    L, V = backend.response_len, len(backend.tok.vocab)
    token = backend.tok.index["red"]
    planted = _planted_logits(2, L, V, token, big=(40.0, 60.0, 80.0))
    backend.model.canvas_logits = lambda prompt_ids, canvas, cache: planted.clone()
    try:
        gen = backend.generate(batch)
    finally:
        del backend.model.canvas_logits
    conf = planted.softmax(-1)[..., token]  # the float32 probabilities the loop ranks
    _assert_ties_planted(conf)
    block = block_length or L
    for b in range(2):
        assert gen.commit_step[b].tolist() == _replay(conf[b].tolist(), block, step_counts(block, steps // (L // block)))


def _llada(kind: str, tmp_path_factory):
    config = lavida_config() if kind == "lavida" else llada_v_config()
    d = write_checkpoint(tmp_path_factory.mktemp(kind), kind, config, seed=1)
    cfg = {"backend": kind, "source": str(d), "device": "cpu", "response_len": 16, "temperature": 0.0,
           "block_length": 8}
    cfg.update({"gen_steps": 6} if kind == "llada_v" else {"step_ratio": 0.5, "schedule": "shift"})
    return load_backend(cfg)


@pytest.mark.parametrize("kind", ["lavida", "llada_v"])
def test_llada_family_commit_order_breaks_planted_ties_by_lowest_position(kind, tmp_path_factory):
    backend = _llada(kind, tmp_path_factory)
    batch, errors = backend.prepare([reference_image(64, 48, 1), reference_image(40, 60, 2)], ["a?", "b?"])
    assert not errors
    L, V, token = backend.response_len, 320, ord("A")
    planted = _planted_logits(2, L, V, token, big=(50.0, 70.0, 90.0)).double()  # float64 softmax saturates later
    if kind == "lavida":
        backend.cached_canvas_logits = lambda context, canvas: planted[:canvas.shape[0]].clone()
        counts = transfer_counts(8, backend.steps_per_block, backend.schedule, backend.shift)
    else:
        backend._canvas_logits = lambda inp, rows, canvas: planted[rows].clone()
        counts = uniform_counts(8, backend.gen_steps // 2)
    gen = backend.generate(batch)
    conf = planted.softmax(-1)[..., token]
    _assert_ties_planted(conf)
    for b in range(2):
        assert gen.commit_step[b].tolist() == _replay(conf[b].tolist(), 8, counts)


def test_diffusion_gemma_accepts_tied_entropies_lowest_position_first():
    """The entropy-bound sampler on planted logits: tie groups of identical rows (equal entropy), the
    bound falling inside a group, so which tied positions are accepted depends on the tie order."""
    rng = np.random.default_rng(3)
    B, L, V = 2, 96, 64
    levels = torch.tensor(rng.normal(size=(4, V)), dtype=torch.float32)
    processed = levels[torch.tensor(rng.integers(0, 4, size=(B, L)))]  # identical rows -> exactly equal entropy
    entropy = torch.distributions.Categorical(logits=processed).entropy()
    _assert_ties_planted(entropy)
    h = sorted(set(entropy[0].tolist()))
    n_low = int((entropy[0] == h[0]).sum())
    bound = (n_low // 2) * h[0] + 1e-4  # accepts half of the lowest-entropy group of row 0
    fake = types.SimpleNamespace(entropy_bound=bound, vocab_size=V, device="cpu")
    canvas, denoised = torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long)
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    accept, _ = DiffusionGemmaBackend._accept_and_renoise(fake, processed, denoised, canvas, [0, 1], gens)
    for b in range(B):
        e = entropy[b].tolist()
        order = sorted(range(L), key=lambda p: (e[p], p))
        acc, total = set(), 0.0
        for p in order:  # accepted while the sum of the entropies before it stays within the bound
            if total <= bound:
                acc.add(p)
            total += e[p]
        assert set(accept[b].nonzero()[:, 0].tolist()) == acc
    assert 0 < int(accept[0].sum()) < n_low + 1
