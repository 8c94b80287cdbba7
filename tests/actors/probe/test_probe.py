import numpy as np
import pytest
import torch

from dcam.actors import scenes
from dcam.actors.models.protocol import ImageSpan, StructuralStateError
from dcam.actors.models.tiny_backend import TinyBackend
from dcam.actors.models.tiny_dmllm import TinyDMLLM, TinyDMLLMConfig, WordTokenizer
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.grid import normalise_maps, slice_grid
from dcam.actors.probe.targets import ProbeConfig
from dcam.actors.probe.variants import GradCamReference, GradNorm, GradXAct, LlavaCam, PaperCam


class _Batch:
    def __init__(self, spans):
        self.spans = spans


def test_vertical_bar_with_separator_column_stays_vertical():
    rows, cols, start, D = 4, 5, 7, 3
    span = ImageSpan(stream="lm", start=start, rows=rows, cols=cols, row_stride=cols + 1)  # LaViDa newline per row
    act = torch.zeros(1, start + rows * (cols + 1) + 2, D)
    for r in range(rows):
        act[0, start + r * (cols + 1) + 2] = 1.0  # the bar: column 2 of every row
        act[0, start + r * (cols + 1) + cols] = 9.0  # the newline token
    grid = slice_grid(act, _Batch([span]), torch.tensor([0]), "h", "lm", [0])[0][..., 0]
    expected = torch.zeros(rows, cols)
    expected[:, 2] = 1.0
    assert torch.equal(grid, expected)
    sheared = act[0, start:start + rows * cols, 0].reshape(rows, cols)  # the reference's h*w slice
    assert not torch.equal(sheared, expected)  # regression: shear + a newline token leak in


def test_structural_state_rule_raises_instead_of_substituting():
    span = ImageSpan(stream="lm", start=10, rows=4, cols=4)
    short = torch.zeros(1, 20, 2)
    with pytest.raises(StructuralStateError, match="step 3"):
        slice_grid(short, _Batch([span]), torch.tensor([0]), "blocks.0.out", "lm", [3])
    with pytest.raises(StructuralStateError, match="decoder"):
        slice_grid(torch.zeros(1, 64, 2), _Batch([span]), torch.tensor([0]), "decoder.0", "decoder", [0])


def _loop_paper_cam(A, G):
    h, w, D = A.shape
    alpha = [max(0.0, 0.0) + sum(max(float(G[i, j, d]), 0.0) for i in range(h) for j in range(w)) / (h * w) for d in range(D)]
    return torch.tensor([[sum(max(alpha[d] * float(A[i, j, d]), 0.0) for d in range(D)) / D for j in range(w)] for i in range(h)])


def test_map_variants_match_plain_loops():
    g = torch.Generator().manual_seed(0)
    A, G = torch.randn(1, 3, 4, 5, generator=g), torch.randn(1, 3, 4, 5, generator=g)
    assert torch.allclose(PaperCam().form(A, G)[0], _loop_paper_cam(A[0], G[0]), atol=1e-6)
    alpha = G[0].mean((0, 1))
    ref = torch.tensor([[sum(max(float(alpha[d] * A[0, i, j, d]), 0) for d in range(5)) / 5 for j in range(4)] for i in range(3)])
    assert torch.allclose(GradCamReference().form(A, G)[0], ref, atol=1e-6)
    assert torch.allclose(GradNorm().form(A, G)[0], torch.tensor([[float(G[0, i, j].norm()) for j in range(4)] for i in range(3)]))
    gxa = torch.tensor([[max(0.0, float((G[0, i, j] * A[0, i, j]).sum())) for j in range(4)] for i in range(3)])
    assert torch.allclose(GradXAct().form(A, G)[0], gxa, atol=1e-6)
    m = LlavaCam().form(A, G)[0]
    assert ((m == 0) | (m >= 0.5)).all() and m.max() == pytest.approx(1.0)


def test_normalise_constant_zero_and_nan():
    assert torch.equal(normalise_maps(torch.full((2, 3, 3), 4.0)), torch.zeros(2, 3, 3))
    assert torch.equal(normalise_maps(torch.zeros(1, 3, 3)), torch.zeros(1, 3, 3))
    x = torch.rand(1, 3, 3) + 0.1
    n = normalise_maps(x)
    assert n.min() == 0 and n.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        normalise_maps(torch.tensor([[[float("nan"), 1.0]]]))


@pytest.fixture(scope="module")
def random_backend():
    torch.manual_seed(0)
    cfg = TinyDMLLMConfig()
    return TinyBackend(TinyDMLLM(cfg), WordTokenizer(cfg.vocab))


def _explain(backend, items, **kw):
    cfg = {"m": ProbeConfig(hook="blocks.1.out", faithfulness_steps=2, **kw)}
    return explain_batch(backend, [s.image for s in items], [s.prompt for s in items], cfg,
                         responses=[s.caption for s in items])


def test_batch_of_8_equals_8_single_calls_and_is_deterministic(random_backend):
    items = scenes.make_scenes(31, 0, 8)
    batched = _explain(random_backend, items)
    again = _explain(random_backend, items)
    for i, s in enumerate(items):
        single = _explain(random_backend, [s])[0]
        assert [m.position for m in single.maps["m"]] == [m.position for m in batched[i].maps["m"]]
        for a, b, c in zip(single.maps["m"], batched[i].maps["m"], again[i].maps["m"]):
            np.testing.assert_allclose(a.raw_map, b.raw_map, atol=1e-5)
            assert np.array_equal(b.raw_map, c.raw_map)
            assert a.deletion_auc == pytest.approx(b.deletion_auc, abs=1e-5)


def test_targets_are_content_words_and_unknown_words_error(random_backend):
    items = scenes.make_scenes(32, 0, 2)
    res = explain_batch(random_backend, [s.image for s in items], ["describe the image", "describe the zebra"],
                        {"m": ProbeConfig(faithfulness_steps=0)}, responses=[items[0].caption, "a red zebra"])
    assert res[1].error is not None and res[1].error.kind == "prompt"
    toks = [m.token for m in res[0].maps["m"]]
    assert toks == [w for w in items[0].caption.split() if w not in ("a", "and")]
    absent = next(c for c in scenes.COLOURS if c not in items[0].caption.split())
    res = explain_batch(random_backend, [items[0].image], ["describe the image"], {"m": ProbeConfig(faithfulness_steps=0)},
                        responses=[items[0].caption], words=[[absent]])
    assert res[0].error is not None and res[0].error.kind == "target" and absent in str(res[0].error)


@pytest.mark.parametrize("hook", ["blocks.3.out", "blocks.3.mlp", "blocks.3.ln2", "blocks.3.attn", "final_norm"])
def test_tiny_states_after_the_last_keys_and_values_are_refused_for_gradients(random_backend, hook):
    """The canvas reads image states only through each block's K/V: after the last block's attention
    input their gradient is identically zero, so a gradient map is refused, never all-zero; a
    forward-only read (TAM's final_norm) still works."""
    item = scenes.make_scenes(33, 0, 1)[0]
    batch, _ = random_backend.prepare([item.image], [item.prompt], [item.caption])
    canvas = torch.full((1, random_backend.response_len), random_backend.mask_id)
    with pytest.raises(StructuralStateError, match="never reach"):
        random_backend.attribution_forward(batch, torch.tensor([0]), canvas, [hook])
    with torch.no_grad():
        assert hook in random_backend.attribution_forward(batch, torch.tensor([0]), canvas, [hook]).activations
    out = random_backend.attribution_forward(batch, torch.tensor([0]), canvas, ["blocks.3.ln1"])
    g = torch.autograd.grad(out.logits[0, 0].logsumexp(-1), out.activations["blocks.3.ln1"])[0]
    assert g[0, torch.as_tensor(batch.spans[0].positions().reshape(-1))].abs().sum() > 0


def test_curves_are_measured_on_the_refined_map_of_the_sampled_words():
    """Issue 13 defect 1 / issue 17 item 1: with the method's RefineConfig, each sampled word's AUCs are the
    curves of its refined map (the map the CPU stage writes); unsampled words keep NaN AUCs and say so.
    Shipped weights: a random model's word probability barely depends on the image, so its curves are flat."""
    from dcam.actors.methods import refine_config
    from dcam.actors.probe.faithfulness import faithfulness, in_faithfulness_sample
    from dcam.actors.probe.targets import build_targets, obtain_response
    from dcam.actors.refine import refine_batch

    backend = TinyBackend.load()
    items = scenes.make_scenes(33, 0, 3, scenes.SceneConfig(size=backend.model.config.image_size))
    ids = [f"s{i}" for i in range(3)]
    pc = ProbeConfig(hook="blocks.0.out", faithfulness_steps=8, faithfulness_sample=0.5, seed=4)
    rc = refine_config("diffusion_cam", backend.eos_id)
    res = explain_batch(backend, [s.image for s in items], [s.prompt for s in items], {"m": pc},
                        responses=[s.caption for s in items], refines={"m": rc}, ids=ids)
    batch, _ = backend.prepare([s.image for s in items], [s.prompt for s in items], [s.caption for s in items])
    gen = obtain_response(backend, batch, 0)
    seen, raw_differs = {True: 0, False: 0}, []
    for j, r in enumerate(res):
        targets = build_targets(backend, gen, pc, {j: [m.position for m in r.maps["m"]]})
        for m, t in zip(r.maps["m"], targets):
            assert m.faithfulness_sampled == in_faithfulness_sample(ids[j], m.position, 4, 0.5)
            seen[m.faithfulness_sampled] += 1
            if not m.faithfulness_sampled:
                assert np.isnan(m.deletion_auc) and np.isnan(m.insertion_auc)
                continue
            fine = refine_batch(m.raw_map[None], rc, token_ids=[r.response_ids + [backend.eos_id]])
            with torch.no_grad():
                d, i = faithfulness(backend, batch, torch.tensor([j]).repeat(2), t.canvas[None].repeat(2, 1),
                                    torch.tensor([t.position]).repeat(2), torch.tensor([t.token_id]).repeat(2),
                                    np.concatenate([fine, m.raw_map[None]]), 8)
            raw_differs.append(abs(float(d[1]) - float(d[0])) > 1e-3)
            assert (m.deletion_auc, m.insertion_auc) == (pytest.approx(float(d[0]), abs=1e-5), pytest.approx(float(i[0]), abs=1e-5))
    assert seen[True] and seen[False]
    assert any(raw_differs)  # the raw map's curves are other curves: the old behaviour fails this test
    with pytest.raises(ValueError, match="ids"):
        explain_batch(backend, [items[0].image], [items[0].prompt], {"m": pc}, responses=[items[0].caption])
