"""What LaViDa and LLaDA-V share, on tiny random checkpoints written in the public layout (reference
key names, config.json with auto_map, a 320-id byte tokenizer) and loaded by `load_backend`:
image spans, hooks and the structurally-valid-state rule, blanking, the planted-signal check,
maps through the probe, and loading (auto_map exemption, refusals)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from llada_testing import lavida_config, llada_v_config, reference_image, write_checkpoint

from dcam.actors.models import load_backend
from dcam.actors.models.loading import CheckpointError
from dcam.actors.models.protocol import StructuralStateError
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.targets import ProbeConfig

KINDS = ("lavida", "llada_v")
CONFIGS = {"lavida": lavida_config, "llada_v": llada_v_config}
BASE_SIDE = {"lavida": 14, "llada_v": 27}


def _load(directory, kind, **opts):
    cfg = {"backend": kind, "source": str(directory), "device": "cpu", "response_len": 8, "temperature": 0.0}
    cfg.update({"gen_steps": 4} if kind == "llada_v" else {"step_ratio": 0.5})
    cfg.update(opts)
    return load_backend(cfg)


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    kind = request.param
    d = write_checkpoint(tmp_path_factory.mktemp(kind), kind, CONFIGS[kind](), seed=1)
    return kind, d, _load(d, kind)


@pytest.fixture(scope="module")
def batch(tiny):
    _, _, be = tiny
    b, errors = be.prepare([reference_image(200, 150, 1), reference_image(90, 160, 2)], ["what is this?", "colours?"])
    assert not errors
    return b


def test_spans_are_the_grid_without_the_newline_column_and_the_base_view(tiny, batch):
    kind, d, be = tiny
    side = BASE_SIDE[kind]
    for i, sp in enumerate(batch.spans):
        start = int(batch.inputs["image_start"][i])
        assert sp.stream == "lm" and sp.start == start + side * side and sp.row_stride == sp.cols + 1
        emb = batch.inputs["prefix_embeds"][i]
        rows = torch.arange(sp.rows)
        assert torch.equal(emb[sp.start + rows * sp.row_stride + sp.cols], be.model.image_newline.expand(sp.rows, -1))
        assert not (emb[torch.as_tensor(sp.positions().reshape(-1))] == be.model.image_newline).all(-1).any()
    base = _load(d, kind, image_view="base")
    b2, _ = base.prepare([reference_image(200, 150, 1)], ["what is this?"])
    assert (b2.spans[0].rows, b2.spans[0].cols, b2.spans[0].row_stride) == (side, side, None)
    assert b2.spans[0].start == int(b2.inputs["image_start"][0])


def test_gradient_reaches_every_grid_cell_at_the_named_hooks(tiny, batch):
    _, _, be = tiny
    canvas = torch.full((2, 8), be.mask_id)
    for name in ("early", "mid", "mid_norm2"):
        hook = be.named_hooks()[name]
        out = be.attribution_forward(batch, torch.arange(2), canvas, [hook])
        g = torch.autograd.grad(out.logits[:, 0, 97].sum(), out.activations[hook])[0]
        for i, sp in enumerate(batch.spans):
            assert (g[i, torch.as_tensor(sp.positions().reshape(-1))].norm(dim=-1) > 0).all(), (name, i)


@pytest.mark.parametrize("hook", ["layers.1.out", "final_norm", "layers.1.mlp", "layers.1.ln2", "layers.1.attn"])
def test_states_after_the_last_keys_and_values_are_refused_for_gradients(tiny, batch, hook):
    """Their gradient w.r.t. the image is identically zero: refused, never an all-zero map."""
    _, _, be = tiny
    canvas = torch.full((1, 8), be.mask_id)
    with pytest.raises(StructuralStateError, match="never reach"):
        be.attribution_forward(batch, torch.tensor([0]), canvas, [hook])
    with torch.no_grad():  # forward-only reads (TAM's final_norm) are fine
        out = be.attribution_forward(batch, torch.tensor([0]), canvas, [hook])
    assert out.activations[hook].shape[1] == batch.inputs["prefix_embeds"].shape[1] + 8
    out = be.attribution_forward(batch, torch.tensor([0]), canvas, ["layers.1.ln1"])  # feeds the last K/V: allowed
    g = torch.autograd.grad(out.logits[0, 0, 97], out.activations["layers.1.ln1"])[0]
    assert g[0, torch.as_tensor(batch.spans[0].positions().reshape(-1))].abs().sum() > 0
    with pytest.raises(KeyError):
        be.hook_stream("layers.9.out")


def test_blanking_replaces_cells_of_the_view_with_grey_image_tokens(tiny, batch):
    kind, _, be = tiny
    sp = batch.spans[0]
    keep = torch.ones(3, sp.rows * sp.cols, dtype=torch.bool)
    keep[1] = False
    keep[2, 5] = False
    canvas = torch.full((3, 8), be.mask_id)
    with torch.no_grad():
        z = be.attribution_forward(batch, torch.zeros(3, dtype=torch.long), canvas, [], image_keep=keep).logits
        plain = be.attribution_forward(batch, torch.tensor([0]), canvas[:1], []).logits[0]
    torch.testing.assert_close(z[0], plain, atol=1e-6, rtol=0)
    assert (z[1] - plain).abs().max() > 1e-5 and (z[2] - plain).abs().max() > 0
    side = BASE_SIDE[kind]
    blank = be._blank_block(batch, 0)
    torch.testing.assert_close(blank[:side * side], be._grey_features()[0].reshape(side * side, -1))


def test_maps_through_the_probe_have_the_grid_shape_and_a_batch_equals_its_singles(tiny):
    _, _, be = tiny
    cfg = {"m": ProbeConfig(variant="grad_norm", hook=be.named_hooks()["early"], contrast="logprob",
                            targets="index:0", faithfulness_steps=2)}
    images, prompts = [reference_image(200, 150, 1), reference_image(90, 160, 2)], ["what is this?", "colours?"]
    both = explain_batch(be, images, prompts, cfg, responses=["red", None])
    for j in range(2):
        alone = explain_batch(be, images[j:j + 1], prompts[j:j + 1], cfg, responses=[["red", None][j]])[0]
        m, m1 = both[j].maps["m"][0], alone.maps["m"][0]
        assert both[j].error is None and m.raw_map.shape == m1.raw_map.shape
        np.testing.assert_allclose(m.raw_map, m1.raw_map, atol=1e-5)
        np.testing.assert_allclose(m.deletion_auc, m1.deletion_auc, atol=1e-5)
    b, _ = be.prepare(images[:1], prompts[:1])
    assert both[0].maps["m"][0].raw_map.shape == (b.spans[0].rows, b.spans[0].cols)


# -- planted signal ---------------------------------------------------------------------------------
K, B, T, M = 0, 1, 4, 5  # residual channels: lit image content, image baseline, text, read-out


def _plant(model):
    """Weights under which the explained token's logit is decided by bright image cells alone:
    SigLIP passes the patch brightness through (channel 0, black = 0); the projector puts it on
    channel K (plus a constant baseline B on every image token); LM block 0 is the identity; block 1
    lets canvas queries (text channel T) attend to keys on channel K with a large score, using the
    lowest RoPE frequency (no positional oscillation), and writes the lit content to channel M,
    which the LM head reads for the token "a". Black cells carry exactly no K content."""
    g = dict(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.vision_tower.embeddings
        emb.patch_embedding.weight[0] = 1.0 / emb.patch_embedding.weight[0].numel()
        emb.patch_embedding.bias[0] = 1.0  # normalised black is -1
        proj0, proj2 = model.mm_projector[0], model.mm_projector[2]
        proj0.weight[K, 0], proj0.bias[B] = 1.0, 1.0
        proj2.weight[K, K], proj2.weight[B, B] = 1.0, 1.0
        model.image_newline[B] = F.gelu(torch.tensor(1.0))
        lm = model.lm
        lm.model.embed_tokens.weight[:, T] = 1.0
        for name, p in g.items():
            if name.endswith(("norm.weight", "layernorm.weight")) or ".layer_norm" in name:
                p.fill_(1.0)
        attn = lm.layers[1].self_attn
        hd = attn.head_dim
        attn.q_proj.weight[hd // 2 - 1, T] = 1.6
        attn.k_proj.weight[hd // 2 - 1, K] = 1.6
        attn.v_proj.weight[0, K] = 1.0
        attn.o_proj.weight[M, 0] = 1.0
        lm.lm_head.weight[ord("a"), M] = 0.5  # the explained token (byte tokenizer: id = byte)


def _planted_image():
    """384 x 768 (W x H: exactly the 1 x 2-tile pinpoint, no resize, no padding), black, with one
    bright 14 x 14 patch at patch (6, 6) of the top tile."""
    img = np.zeros((768, 384, 3), np.uint8)
    img[84:98, 84:98] = 255
    return img


def test_planted_signal_the_maps_argmax_is_the_planted_cell(tiny, tmp_path):
    """LaViDa pools 27 -> 14 bilinearly: patch 6 reaches pooled cell 3 only; LLaDA-V keeps patch (6, 6)."""
    kind, _, _ = tiny
    d = write_checkpoint(tmp_path / "planted", kind, CONFIGS[kind](), seed=1, edit=_plant)
    be = _load(d, kind)
    cfg = {"m": ProbeConfig(variant="grad_norm", hook=be.named_hooks()["early"], contrast="logprob",
                            targets="index:0", faithfulness_steps=0)}
    out = explain_batch(be, [_planted_image()], ["what is this?"], cfg, responses=["a"])[0]
    m = out.maps["m"][0].raw_map
    cell = (3, 3) if kind == "lavida" else (6, 6)
    assert m.shape == ((28, 14) if kind == "lavida" else (54, 27))
    assert np.unravel_index(np.argmax(m), m.shape) == cell
    rest = np.delete(m.reshape(-1), np.ravel_multi_index(cell, m.shape))
    assert rest.max() < 1e-3 * m.max()  # no other cell matters
    dark = explain_batch(be, [np.zeros((768, 384, 3), np.uint8)], ["what is this?"], cfg, responses=["a"])[0]
    assert dark.maps["m"][0].target_prob < out.maps["m"][0].target_prob  # the bright cell raises the token


# -- loading ----------------------------------------------------------------------------------------
def test_auto_map_is_accepted_for_the_native_model_type_only(tiny, tmp_path):
    kind, d, be = tiny
    assert be.model_id == d and be.mask_id == 258 and be.eos_ids == (261, 257)
    with pytest.raises(CheckpointError, match="never runs checkpoint code"):
        _load(d, kind, trust_remote_code=True)
    other = write_checkpoint(tmp_path / "tok", kind, CONFIGS[kind](), seed=1)
    tc = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(CheckpointError, match="custom code in tokenizer_config.json"):
        _load(other, kind)
    foreign = write_checkpoint(tmp_path / "foreign", kind, {**CONFIGS[kind](), "model_type": "evil"}, seed=1)
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        _load(foreign, kind)
    swapped = "llada_v" if kind == "lavida" else "lavida"
    with pytest.raises(CheckpointError, match=f"model={swapped}|match no key rule"):
        _load(d, swapped)


def test_loads_a_hub_id_from_the_local_hugging_face_cache(tiny, tmp_path):
    """A snapshot already in the local HF cache (the layout huggingface_hub writes) is found by hub id; the hub
    itself is never contacted."""
    import shutil

    kind, d, _ = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / "models--acme--tiny-llada"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(d, base / "snapshots" / commit)
    be = _load("acme/tiny-llada", kind, hf_cache_dir=str(tmp_path / "hub"))
    assert be.model_id == "acme/tiny-llada" and be.model.lm.config.num_layers == 2
