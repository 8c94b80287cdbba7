"""MMaDA backend: parity with the authors' code (vendored numbers: the understanding sequence, canvas
logits incl. left padding, mmu_generate's temperature-0 commit order), the key mapping, hooks over
the code span, mask-token blanking, the planted-signal check and loading (auto_map, S3).
The parity model is the fixtures' tiny random configuration: real vocabulary and ids (134656 = 126464
+ 8192 codes, code offset 126349), d_model 32, 2 blocks, the tiny MAGVIT-v2 of magvit2_codes.json."""
import json

import numpy as np
import pytest
import torch
from llada_testing import _map
from mmada_testing import (
    LM_VOCAB,
    TEXT_VOCAB,
    fixture,
    lm_reference_shapes,
    mmada_config,
    mmada_tokenizer,
    reference_image,
    write_mmada_checkpoint,
    write_vq_checkpoint,
)
from seeded_weights import seeded_weights

from dcam.actors.models import load_backend, magvit2
from dcam.actors.models.llada_lm import LladaLM, LladaLMConfig
from dcam.actors.models.loading import CheckpointError
from dcam.actors.models.mmada import REFERENCE_RULES, MmadaBackend, MmadaModel
from dcam.actors.models.protocol import StructuralStateError
from dcam.actors.models.remasking import top_k_lowest_first as commit_lowest_first
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.targets import ProbeConfig

LOGITS, CODES = fixture("mmada_logits.json"), fixture("magvit2_codes.json")
MASK = 126336


def _vq(seed=CODES["seed"]):
    state = seeded_weights({k: tuple(v) for k, v in CODES["shapes"].items()}, seed)
    native = {k[len("encoder."):]: v for k, v in state.items()}
    vq = magvit2.Magvit2Encoder(magvit2.Magvit2Config.from_shapes({k: tuple(v.shape) for k, v in native.items()}))
    vq.load_state_dict(native, strict=True)
    return vq


@pytest.fixture(scope="module")
def parity():
    lm = LladaLM(LladaLMConfig.from_olmo(LOGITS["llada_config"]))
    state = seeded_weights(lm_reference_shapes(mmada_config()), LOGITS["seed"])
    lm.load_state_dict({_map(k, REFERENCE_RULES): v for k, v in state.items()}, strict=True)
    return MmadaBackend(MmadaModel(lm, _vq()), mmada_tokenizer(), response_len=8, gen_steps=8, block_length=8)


@pytest.fixture(scope="module")
def batch(parity):
    s = LOGITS["samples"]
    images = [reference_image(x["image"]["width"], x["image"]["height"], x["image"]["seed"]) for x in s]
    b, errors = parity.prepare(images, [x["question"] for x in s])
    assert not errors and b.size == 2
    return b


def test_reference_keys_map_one_to_one_onto_the_native_lm(parity):
    ref = lm_reference_shapes({**mmada_config(), **{k: LOGITS["llada_config"][k] for k in ("d_model", "n_layers")}})
    mapped = {k: _map(k, REFERENCE_RULES) for k in ref}
    native = parity.model.lm.state_dict()
    assert None not in mapped.values() and len(set(mapped.values())) == len(mapped) == len(native)
    assert all(ref[k] == tuple(native[v].shape) for k, v in mapped.items())
    assert parity.code_offset == LOGITS["code_offset"] == TEXT_VOCAB and native["lm_head.weight"].shape[0] == LM_VOCAB


def test_understanding_sequence_is_the_references(parity, batch):
    """<|mmu|> <|soi|> 1024 code tokens (the native tokenizer's codes + 126349) <|eoi|> chat template: every id."""
    assert LOGITS["task_ids"] == {"<|mmu|>": 126089, "<|soi|>": 126084, "<|eoi|>": 126085}
    for i, s in enumerate(LOGITS["samples"]):
        ids = batch.inputs["prefix_ids"][i][batch.inputs["prefix_valid"][i]]
        assert ids.tolist() == s["input_ids"]
        sp = batch.spans[i]
        assert (sp.rows, sp.cols, sp.stream) == (32, 32, "lm")
        codes = batch.inputs["prefix_ids"][i][torch.as_tensor(sp.positions().reshape(-1))]
        assert codes.tolist() == [c + TEXT_VOCAB for c in CODES["images"][i]["codes"]]  # raster order
        assert batch.inputs["prefix_ids"][i][sp.start - 1] == 126084 and batch.inputs["prefix_ids"][i][sp.end] == 126085


def test_canvas_logits_match_the_reference_batched_with_left_padding(parity, batch):
    """Both samples (1073 and 1071 prompt tokens) in one left-padded batch reproduce the reference's
    batch-1 logits and its padded-batch logits (mmu_generate's bool attention_bias)."""
    probe, tol = LOGITS["probe_ids"], LOGITS["tolerance"]["logits_atol"]
    for i, s in enumerate(LOGITS["samples"]):
        for k, ref in enumerate(s["canvas_logits"]):
            with torch.no_grad():
                z = parity.attribution_forward(batch, torch.tensor([i]), torch.tensor([ref["canvas"]]), []).logits[0]
            z = z.double()
            top = z.topk(8, -1)
            assert top.indices.tolist() == ref["topk_ids"]
            np.testing.assert_allclose(top.values.numpy().ravel(), ref["topk_values"], atol=tol)
            np.testing.assert_allclose(z[:, probe].numpy().ravel(), ref["probe_values"], atol=tol)
            np.testing.assert_allclose(torch.logsumexp(z, -1).numpy(), ref["logsumexp"], atol=tol)
            pad = next(p for p in LOGITS["padded"] if p["sample"] == i and p["canvas"] == k)
            assert pad["topk_ids"] == ref["topk_ids"]
            np.testing.assert_allclose(torch.logsumexp(z, -1).numpy(), pad["logsumexp"], atol=tol)


def _configure(be, st):
    be.response_len, be.gen_steps, be.block_length = st["max_new_tokens"], st["steps"], st["block_length"]


@pytest.mark.parametrize("k", range(4))
def test_commit_order_matches_the_reference_mmu_generate(parity, batch, k):
    """Temperature 0, one block, two blocks, more steps than tokens (zero-token passes), three blocks:
    ids, per-position commit step and number of passes, both samples batched."""
    gen_fx = fixture("mmada_generate.json")
    settings = []
    for r in gen_fx["runs"]:
        if r["settings"] not in settings:
            settings.append(r["settings"])
    st = settings[k]
    _configure(parity, st)
    try:
        gen = parity.generate(batch)
    finally:
        _configure(parity, dict(max_new_tokens=8, steps=8, block_length=8))
    questions = [s["question"] for s in LOGITS["samples"]]
    runs = [r for r in gen_fx["runs"] if r["settings"] == st]
    assert len(runs) == 2 and gen_fx["reference_padded_batch_equals_singles"]
    for r in runs:
        i = questions.index(r["question"])
        assert gen.n_steps == r["n_passes"]
        assert gen.ids[i].tolist() == r["ids"]
        assert gen.commit_step[i].tolist() == r["commit_step"]


def test_each_pass_read_exactly_the_state_the_trajectory_reports(parity, batch):
    gen = parity.generate(batch)
    assert len(parity.last_trace) == gen.n_steps == 8
    assert ((gen.commit_step >= 0) & (gen.commit_step < gen.n_steps)).all()
    for s, seen in enumerate(parity.last_trace):
        assert torch.equal(gen.state_before(torch.arange(2), torch.full((2,), s), MASK), seen)


def test_commit_lowest_first_breaks_exact_ties_by_position():
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.5, float("-inf")], [0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    assert commit_lowest_first(conf, 2).tolist() == [[True, True, False, False, False], [True, True, False, False, False]]
    assert commit_lowest_first(conf, 5)[0].tolist() == [True, True, True, True, False]  # -inf never taken
    assert not commit_lowest_first(conf, 0).any()


def test_a_batch_equals_its_samples_alone_with_seeded_sampling(parity, batch):
    parity.temperature = 0.7
    try:
        both = parity.generate(batch, seed=11)
        s = LOGITS["samples"][1]
        alone_b, _ = parity.prepare([reference_image(s["image"]["width"], s["image"]["height"], s["image"]["seed"])],
                                    [s["question"]])
        alone = parity.generate(alone_b, seed=11)
    finally:
        parity.temperature = 0.0
    assert torch.equal(both.ids[1], alone.ids[0]) and torch.equal(both.commit_step[1], alone.commit_step[0])


# -- hooks and blanking -----------------------------------------------------------------------------
def test_gradient_starts_at_the_code_embeddings_and_reaches_every_cell(parity, batch):
    canvas = torch.full((2, 8), MASK)
    for hook in ("embed", parity.named_hooks()["early"]):
        out = parity.attribution_forward(batch, torch.arange(2), canvas, [hook])
        g = torch.autograd.grad(out.logits[:, 0, 97].sum(), out.activations[hook])[0]
        for i, sp in enumerate(batch.spans):
            assert (g[i, torch.as_tensor(sp.positions().reshape(-1))].norm(dim=-1) > 0).all(), hook
        if hook == "embed":  # the hooked embeddings are the code tokens' rows of the embedding table
            pos = torch.as_tensor(batch.spans[0].positions().reshape(-1))
            torch.testing.assert_close(out.activations[hook][0, pos],
                                       parity.model.lm.embed(batch.inputs["prefix_ids"][0, pos]))
    with pytest.raises(StructuralStateError, match="never reach"):
        parity.attribution_forward(batch, torch.tensor([0]), canvas[:1], ["layers.1.out"])


def test_blanking_puts_the_mask_token_embedding_on_dropped_cells(parity, batch):
    sp = batch.spans[0]
    keep = torch.ones(3, 1024, dtype=torch.bool)
    keep[1] = False
    keep[2, 37] = False
    canvas = torch.full((3, 8), MASK)
    with torch.no_grad():
        out = parity.attribution_forward(batch, torch.zeros(3, dtype=torch.long), canvas, ["embed"], image_keep=keep)
        plain = parity.attribution_forward(batch, torch.tensor([0]), canvas[:1], []).logits[0]
    torch.testing.assert_close(out.logits[0], plain, atol=1e-6, rtol=0)
    assert (out.logits[1] - plain).abs().max() > 1e-5 and (out.logits[2] - plain).abs().max() > 0
    mask_emb = parity.model.lm.embed(torch.tensor(MASK))
    pos = torch.as_tensor(sp.positions().reshape(-1))
    emb = out.activations["embed"]
    assert torch.equal(emb[1, pos], mask_emb.expand(1024, -1))
    assert torch.equal(emb[2, pos[37]], mask_emb) and torch.equal(emb[2, pos[36]], emb[0, pos[36]])
    assert torch.equal(emb[1, :sp.start], emb[0, :sp.start])  # nothing outside the span changes


# -- planted signal ---------------------------------------------------------------------------------
K, T, M = 0, 4, 5  # LM residual channels: the bright code's content, text, read-out
CELL = (5, 9)


def _plant_vq(state):
    """MAGVIT-v2 weights under which every code is 0 except where a code cell's 16 x 16 patch is bright
    (code 8191): conv_in passes the brightness on channel 0, residual and attention branches are off,
    each down-sampling conv keeps its centre tap of channel 0, norm_out keeps the sign, conv_out copies
    it to all 13 bits."""
    for k, v in state.items():
        v.zero_()
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight") or k.endswith(
                "norm_out.weight"):
            v.fill_(1.0)
    state["encoder.conv_in.weight"][0, :, 1, 1] = 1.0 / 3
    for k, v in state.items():
        if k.endswith("downsample.conv.weight"):
            v[0, 0, 1, 1] = 1.0
        elif k.endswith("nin_shortcut.weight"):
            v[0, 0, 0, 0] = 1.0
    state["encoder.conv_out.weight"][:, 0, 1, 1] = 1.0
    state["encoder.quant_conv.weight"][:, :, 0, 0] = torch.eye(13)


def _plant_lm(state):
    """LM weights under which the logit of "a" reads the bright code alone: every token carries the text
    channel T, code 8191's embedding also channel K; block 0 is the identity; in block 1 canvas queries
    attend to keys on K (lowest RoPE frequency) and copy K to M; the head reads M for "a"."""
    for k, v in state.items():
        v.zero_()
        if k.endswith("norm.weight") or k.endswith("ln_f.weight"):
            v.fill_(1.0)
    wte = state["model.transformer.wte.weight"]
    wte[:, T] = 1.0
    wte[TEXT_VOCAB + 8191, K] = 1.0
    hd = 32 // 4
    b = "model.transformer.blocks.1."
    state[b + "q_proj.weight"][hd // 2 - 1, T] = 1.6
    state[b + "k_proj.weight"][hd // 2 - 1, K] = 1.6
    state[b + "v_proj.weight"][0, K] = 1.0
    state[b + "attn_out.weight"][M, 0] = 1.0
    state["model.transformer.ff_out.weight"][ord("a"), M] = 0.5


def _load(lm_dir, vq_dir, **opts):
    cfg = {"backend": "mmada", "source": str(lm_dir), "vq_source": str(vq_dir), "device": "cpu",
           "response_len": 8, "gen_steps": 8, "block_length": 8, "temperature": 0.0}
    cfg.update(opts)
    return load_backend(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmada")
    return write_mmada_checkpoint(d / "lm", seed=1), write_vq_checkpoint(d / "vq", seed=2)


def test_planted_signal_the_maps_argmax_is_the_planted_code_cell(tmp_path):
    """One bright 16 x 16 patch -> code 8191 at one cell of the 32 x 32 grid, the only code the
    explained token reads: the map's argmax is that cell and no other cell matters."""
    lm = write_mmada_checkpoint(tmp_path / "lm", seed=1, edit=_plant_lm)
    vq = write_vq_checkpoint(tmp_path / "vq", seed=2, edit=_plant_vq)
    be = _load(lm, vq)
    img = np.zeros((512, 512, 3), np.uint8)
    r, c = CELL
    img[16 * r:16 * r + 16, 16 * c:16 * c + 16] = 255
    b, _ = be.prepare([img], ["what is this?"])
    codes = b.inputs["prefix_ids"][0][torch.as_tensor(b.spans[0].positions().reshape(-1))] - TEXT_VOCAB
    assert codes.view(32, 32)[CELL] == 8191 and int((codes != 0).sum()) == 1
    cfg = {"m": ProbeConfig(variant="grad_norm", hook=be.named_hooks()["early"], contrast="logprob",
                            targets="index:0", faithfulness_steps=0)}
    out = explain_batch(be, [img], ["what is this?"], cfg, responses=["a"])[0]
    m = out.maps["m"][0].raw_map
    assert m.shape == (32, 32) and np.unravel_index(np.argmax(m), m.shape) == CELL
    rest = np.delete(m.reshape(-1), np.ravel_multi_index(CELL, m.shape))
    assert rest.max() < 1e-3 * m.max()
    dark = explain_batch(be, [np.zeros((512, 512, 3), np.uint8)], ["what is this?"], cfg, responses=["a"])[0]
    assert dark.maps["m"][0].target_prob < out.maps["m"][0].target_prob


# -- loading ----------------------------------------------------------------------------------------
def test_auto_map_is_accepted_for_model_type_mmada_only(checkpoints, tmp_path):
    lm, vq = checkpoints
    be = _load(lm, vq, resolution=64)
    assert be.model_id == lm and be.mask_id == MASK and be.code_offset == TEXT_VOCAB and be.grid == 4
    assert json.loads(open(f"{lm}/config.json").read())["auto_map"]
    with pytest.raises(CheckpointError, match="never runs checkpoint code"):
        _load(lm, vq, trust_remote_code=True)
    with pytest.raises(CheckpointError, match="vq_source"):
        load_backend({"backend": "mmada", "source": lm})
    foreign = write_mmada_checkpoint(tmp_path / "foreign", {**mmada_config(), "model_type": "evil"}, seed=1)
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        _load(foreign, vq)
    with pytest.raises(CheckpointError, match="custom code"):
        _load(lm, lm)  # the vq directory gets no auto_map exemption
    (tmp_path / "novq").mkdir()
    (tmp_path / "novq" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="MAGVIT-v2 directory"):
        _load(lm, tmp_path / "novq")
    with pytest.raises(CheckpointError, match="custom code in config.json"):  # mmada's exemption is its own
        load_backend({"backend": "lavida", "source": lm})


def test_loads_both_directories_from_s3(checkpoints, s3_bucket, tmp_path):
    """The LM and the MAGVIT-v2 directories from S3 prefixes (moto): the same model as from local dirs."""
    import fsspec

    lm, vq = checkpoints
    so = s3_bucket.storage_options
    fs = fsspec.filesystem("s3", **{k: so[k] for k in ("key", "secret", "endpoint_url")})
    urls = []
    for d, prefix in ((lm, "ck/mmada"), (vq, "ck/magvitv2")):
        for f in sorted(__import__("os").listdir(d)):
            fs.put_file(f"{d}/{f}", f"{s3_bucket.name}/{prefix}/{f}")
        urls.append(f"{s3_bucket.url}/{prefix}")
    remote = _load(*urls, resolution=64, cache_dir=str(tmp_path / "cache"),
                   storage_options={k: so[k] for k in ("key", "secret", "endpoint_url")})
    local = _load(lm, vq, resolution=64)
    img = reference_image(100, 80, 3)
    (b1, _), (b2, _) = remote.prepare([img], ["hi"]), local.prepare([img], ["hi"])
    assert torch.equal(b1.inputs["prefix_ids"], b2.inputs["prefix_ids"])
    canvas = torch.full((1, 8), MASK)
    with torch.no_grad():
        torch.testing.assert_close(remote.attribution_forward(b1, torch.tensor([0]), canvas, []).logits,
                                   local.attribution_forward(b2, torch.tensor([0]), canvas, []).logits)
    assert remote.model_id == urls[0].split("://", 1)[1]
