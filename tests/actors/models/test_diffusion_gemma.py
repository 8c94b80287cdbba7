"""DiffusionGemma backend on a tiny random DiffusionGemmaForBlockDiffusion (built here; no download)."""
import json

import numpy as np
import pytest
import torch

from dcam.actors.models.diffusion_gemma import NOISE, ByteTokenizer, DiffusionGemmaBackend, tiny_config
from dcam.actors.models.loading import CheckpointError
from dcam.actors.models.protocol import SampleError, StructuralStateError
from dcam.actors.probe.contrast import target_scores
from dcam.actors.probe.explain import explain_batch
from dcam.actors.probe.grid import slice_grid
from dcam.actors.probe.targets import ProbeConfig

GEN_STEPS = 4


@pytest.fixture(scope="module")
def tiny():
    from transformers import DiffusionGemmaForBlockDiffusion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a shared 2-core box
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(tiny_config()).eval()
    yield DiffusionGemmaBackend(model, gen_steps=GEN_STEPS, max_soft_tokens=70)
    torch.set_num_threads(threads)


def _images(n, shapes=((48, 80), (64, 64), (48, 80), (80, 48)), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


PROMPTS = ["describe the image", "what is red?", "x", "where is the cube"]


def _mid(be):
    return ProbeConfig(variant="grad_norm", hook=be.named_hooks()["mid"], state="trajectory", contrast="logprob",
                       faithfulness_steps=0)


def test_generation_is_a_trajectory_and_matches_the_models_own_generate(tiny):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    images = _images(3)
    batch, errors = tiny.prepare(images, PROMPTS[:3])
    assert not errors and batch.size == 3
    gen = tiny.generate(batch, seed=3)
    L = tiny.response_len
    assert gen.ids.shape == gen.commit_step.shape == (3, L) and gen.n_steps == GEN_STEPS
    assert ((gen.commit_step >= 0) & (gen.commit_step < GEN_STEPS)).all()  # every canvas position is committed
    trace = tiny.last_trace
    for s in range(trace["inputs"].shape[0]):  # the protocol's state = what the decoder really saw at step s
        kept = gen.commit_step < s
        assert torch.equal(trace["inputs"][s][kept], gen.ids[kept])
        assert torch.equal(gen.state_before(torch.arange(3), torch.full((3,), s), tiny.mask_id)[kept], gen.ids[kept])
    # one sample alone = its row of the batch = transformers' generate after torch.manual_seed(seed)
    single, _ = tiny.prepare(images[1:2], PROMPTS[1:2])
    one = tiny.generate(single, seed=3)
    assert torch.equal(one.ids[0], gen.ids[1]) and torch.equal(one.commit_step[0], gen.commit_step[1])
    inp = single.inputs
    torch.manual_seed(3)
    ref = tiny.model.generate(
        input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"],
        image_position_ids=inp["image_position_ids"], mm_token_type_ids=inp["mm_token_type_ids"], max_new_tokens=L,
        max_denoising_steps=GEN_STEPS, t_min=tiny.t_min, t_max=tiny.t_max,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=tiny.entropy_bound), eos_token_id=None, pad_token_id=None)
    assert torch.equal(ref.sequences[0, inp["input_ids"].shape[1]:], one.ids[0])


def test_forced_trajectory_commits_the_given_response(tiny):
    batch, _ = tiny.prepare(_images(2), PROMPTS[:2], ["a red cube", "blue"])
    gen = tiny.forced_trajectory(batch)
    r = tiny.tok.encode("a red cube")
    assert gen.ids[0, :len(r)].tolist() == r and int(gen.ids[0, len(r)]) == tiny.eos_id
    assert (gen.ids[0, len(r) + 1:] == tiny.pad_id).all()
    assert ((gen.commit_step >= 0) & (gen.commit_step < GEN_STEPS)).all() and gen.source == "given"
    assert tiny.decode(gen.ids[1, :4]) == "blue"


def test_attribution_logits_match_the_full_model_forward(tiny):
    images = _images(2)
    batch, _ = tiny.prepare(images, PROMPTS[:2])  # padded batch: sample 1 is shorter
    canvas = torch.randint(0, tiny.vocab_size, (3, tiny.response_len), generator=torch.Generator().manual_seed(1))
    canvas[1, 5:] = NOISE
    with torch.no_grad():
        out = tiny.attribution_forward(batch, torch.tensor([0, 0, 1]), canvas, [])
    filled = torch.where(canvas == NOISE, tiny._noise[None].expand_as(canvas), canvas)
    for k, i in enumerate([0, 0, 1]):
        one, _ = tiny.prepare(images[i:i + 1], PROMPTS[i:i + 1])
        inp = one.inputs
        T = inp["input_ids"].shape[1]
        cache = tiny._new_cache()
        pos = torch.arange(T, dtype=torch.int32)[None]
        masks = tiny._encoder_masks(inp["attention_mask"], inp["mm_token_type_ids"], cache, pos)
        with torch.no_grad():
            ref = tiny.model(input_ids=inp["input_ids"], attention_mask=masks, cache=cache, position_ids=pos,
                             pixel_values=inp["pixel_values"], image_position_ids=inp["image_position_ids"],
                             decoder_input_ids=filled[k:k + 1]).logits
        assert torch.allclose(ref[0], out.logits[k], atol=1e-4), (ref[0] - out.logits[k]).abs().max()


def test_maps_have_the_soft_token_grid_and_a_batch_equals_its_singles(tiny):
    images = _images(4)
    responses = ["red box", "a cat", "no", "big sun"]
    cfg = {"m": _mid(tiny)}
    together = explain_batch(tiny, images, PROMPTS, cfg, responses=responses)
    grids = {(48, 80): (6, 10), (64, 64): (8, 8), (80, 48): (10, 6)}
    for i, r in enumerate(together):
        assert r.error is None and r.response == responses[i] and r.response_source == "given"
        maps = r.maps["m"]
        assert [m.token for m in maps] == [c for c in responses[i] if c.isalnum()]
        for m in maps:
            assert m.raw_map.shape == grids[images[i].shape[:2]] and np.isfinite(m.raw_map).all()
            assert m.raw_map.max() == pytest.approx(1.0) and 0 <= m.target_prob <= 1
    for i in range(4):
        alone = explain_batch(tiny, images[i:i + 1], PROMPTS[i:i + 1], cfg, responses=responses[i:i + 1])[0]
        for a, b in zip(alone.maps["m"], together[i].maps["m"], strict=True):
            assert (a.position, a.step) == (b.position, b.step)
            np.testing.assert_allclose(a.raw_map, b.raw_map, atol=1e-5)
            assert a.target_prob == pytest.approx(b.target_prob, abs=1e-5)


def test_gradient_reaches_every_image_token(tiny):
    batch, _ = tiny.prepare(_images(2), PROMPTS[:2], ["red", "dog"])
    gen = tiny.forced_trajectory(batch)
    hook = tiny.named_hooks()["mid"]
    assert hook == "encoder.layers.0.out" and tiny.hook_stream(hook) == "encoder"
    from dcam.actors.probe.targets import Target

    targets = [Target(i, p, int(gen.ids[i, p]), int(gen.commit_step[i, p]),
                      gen.state_before(torch.tensor([i]), gen.commit_step[i, p:p + 1], tiny.mask_id)[0])
               for i in range(2) for p in range(3)]
    rows = torch.tensor([t.sample for t in targets])
    with torch.enable_grad():
        out = tiny.attribution_forward(batch, rows, torch.stack([t.canvas for t in targets]), [hook])
        act = out.activations[hook]
        grad = torch.autograd.grad(target_scores(tiny, out.logits, targets, "logprob").sum(), act)[0]
    assert act.shape[:2] == (len(targets), batch.inputs["input_ids"].shape[1])
    grids = slice_grid(grad, batch, rows, hook, "encoder", [t.step for t in targets])
    for g, i in zip(grids, rows.tolist()):
        assert g.shape[:2] == [(6, 10), (8, 8)][i] and (g.norm(dim=-1) > 0).all()  # every grid cell gets a gradient
    # rows are independent: one row's gradient alone equals its slice of the joint gradient
    with torch.enable_grad():
        one = tiny.attribution_forward(batch, rows[4:5], targets[4].canvas[None], [hook])
        g1 = torch.autograd.grad(target_scores(tiny, one.logits, targets[4:5], "logprob").sum(),
                                 one.activations[hook])[0]
    assert torch.allclose(g1[0], grad[4], rtol=1e-4, atol=1e-6 * float(grad[4].abs().max()))


def test_structurally_invalid_hooks_raise(tiny):
    images = _images(1)
    cfg = ProbeConfig(variant="grad_norm", hook="decoder.layers.0.out", state="trajectory", contrast="logprob",
                      faithfulness_steps=0)
    with pytest.raises(StructuralStateError, match="structurally valid"):  # decoder stream: no image span
        explain_batch(tiny, images, PROMPTS[:1], {"m": cfg}, responses=["red"])
    batch, _ = tiny.prepare(images, PROMPTS[:1], ["red"])
    canvas = torch.full((1, tiny.response_len), NOISE)
    for dead in ("final_norm", "encoder.layers.1.out", "encoder.layers.1.mlp"):  # never reach the decoder's K/V
        with torch.enable_grad(), pytest.raises(StructuralStateError, match="K/V"):
            tiny.attribution_forward(batch, torch.tensor([0]), canvas, [dead])
    with torch.no_grad():  # TAM's logit lens reads final_norm without a gradient: fine
        out = tiny.attribution_forward(batch, torch.tensor([0]), canvas, ["final_norm", "encoder.layers.1.in"])
    assert out.activations["final_norm"].shape == out.activations["encoder.layers.1.in"].shape
    assert tiny.unembed(out.activations["final_norm"]).shape[-1] == tiny.vocab_size
    with torch.enable_grad():  # decoder hooks still give gradients (just no image map)
        out = tiny.attribution_forward(batch, torch.tensor([0]), canvas, ["decoder.embed", "encoder.layers.1.in"])
        g = torch.autograd.grad(out.logits[0, 0].logsumexp(-1), [out.activations["decoder.embed"],
                                                                 out.activations["encoder.layers.1.in"]])
    assert g[0].shape == (1, tiny.response_len, 64) and g[1].abs().sum() > 0


def test_planted_signal_lands_inside_the_region(tiny):
    """Zero the projected image features outside the top-right quadrant (in pixel space): the map of
    the image tokens must put all its mass inside that quadrant (checks span start, row-major order and
    orientation against the vision tower's own patch positions)."""
    image = _images(1)[0]  # 48 x 80 pixels -> 12 x 20 patches of 4 px -> 6 x 10 soft tokens (pool 2)
    H, W = image.shape[:2]
    batch, _ = tiny.prepare([image], PROMPTS[:1])
    pos = batch.inputs["image_position_ids"][0]
    valid = (pos >= 0).all(-1)
    xy = pos[valid]
    k, p = tiny.pooling, tiny.model.config.vision_config.patch_size
    cols = (int(xy[:, 0].max()) + 1) // k
    token = (xy[:, 0] // k + cols * (xy[:, 1] // k)).long()  # the pooler's kernel index of every patch
    inside_patch = (xy[:, 0] * p >= W // 2) & (xy[:, 1] * p < H // 2)
    inside_token = torch.zeros(int(token.max()) + 1).index_add_(0, token, (~inside_patch).float()) == 0  # all patches in
    handle = tiny.model.model.encoder.embed_vision.register_forward_hook(
        lambda mod, a, out: torch.where(inside_token[:, None], out, torch.zeros_like(out)))
    try:
        cfg = ProbeConfig(variant="paper_cam", hook="encoder.embed", state="trajectory", contrast="logprob",
                          faithfulness_steps=0)
        res = explain_batch(tiny, [image], PROMPTS[:1], {"m": cfg}, responses=["red box"])[0]
    finally:
        handle.remove()
    rows, cols = 6, 10
    yy, xx = np.mgrid[0:rows, 0:cols]
    region = (xx * k * p >= W // 2) & (yy * k * p < H // 2)  # grid cells by their own pixel footprint
    assert region.sum() == inside_token.sum() == 15
    for m in res.maps["m"]:
        assert m.raw_map.sum() > 0
        assert m.raw_map[region].sum() / m.raw_map.sum() == pytest.approx(1.0)


def test_image_keep_blanks_image_tokens_only(tiny):
    batch, _ = tiny.prepare(_images(2, shapes=((48, 80),)), PROMPTS[:2])  # image_keep needs one grid size
    canvas = torch.full((2, tiny.response_len), NOISE)
    rows = torch.tensor([0, 1])
    n = [s.rows * s.cols for s in batch.spans]
    with torch.no_grad():
        base = tiny.attribution_forward(batch, rows, canvas, []).logits
        keep_all = tiny.attribution_forward(batch, rows, canvas, [], image_keep=torch.ones(2, n[0], dtype=torch.bool))
        blank = tiny.attribution_forward(batch, rows, canvas, ["encoder.embed"],
                                         image_keep=torch.zeros(2, n[0], dtype=torch.bool))
    assert torch.allclose(base, keep_all.logits, atol=1e-5)
    assert not torch.allclose(base, blank.logits, atol=1e-3)
    emb = blank.activations["encoder.embed"]
    for k, span in enumerate(batch.spans):
        pos = torch.as_tensor(span.positions().reshape(-1))
        assert emb[k, pos].abs().sum() == 0 and emb[k, span.start - 1].abs().sum() > 0  # boi keeps its embedding


def test_prepare_reports_bad_samples_and_metadata(tiny):
    images = _images(4)
    images[2] = np.zeros((5,), dtype=np.uint8)
    batch, errors = tiny.prepare(images, PROMPTS, ["ok", "x" * 40, "fine", ""])
    assert sorted(errors) == [1, 2, 3] and batch.source_index == [0]
    assert all(isinstance(e, SampleError) for e in errors.values())
    assert (errors[1].kind, errors[2].kind, errors[3].kind) == ("response", "image", "response")
    assert batch.spans[0].stream == "encoder" and (batch.spans[0].rows, batch.spans[0].cols) == (6, 10)
    ids = batch.inputs["input_ids"][0]
    start = batch.spans[0].start
    assert int(ids[start - 1]) == tiny.boi_id and int(ids[start + 60]) == tiny.eoi_id
    assert (ids[start:start + 60] == tiny.image_token_id).all() and batch.image_sizes == [(48, 80)]


def test_hook_points_tokens_and_content(tiny):
    pts = tiny.hook_points()
    assert set(tiny.named_hooks().values()) <= set(pts)
    assert tiny.named_hooks()["mid_norm2"] == "encoder.layers.0.pre_ffn_norm"
    assert tiny.hook_stream("final_norm") == "encoder" and tiny.hook_stream("decoder.layers.1.attn") == "decoder"
    with pytest.raises(KeyError):
        tiny.hook_stream("blocks.1.out")
    assert tiny.mask_id == NOISE and tiny.token_str(NOISE) == "<noise>"
    r = tiny.tok.encode("a red, cube.")
    assert tiny.decode(r) == "a red, cube."
    assert [tiny.is_content(t) for t in tiny.tok.encode("r,. 7")] == [True, False, False, False, True]
    assert not any(tiny.is_content(t) for t in (tiny.eos_id, tiny.pad_id, tiny.image_token_id, tiny.boi_id))
    assert tiny.word_type(r[0]) is None and tiny.word_category(r[0]) is None
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert isinstance(tiny.tok, ByteTokenizer)


def _save(model, path):
    model.save_pretrained(str(path))
    return path


def test_save_load_local_dir_and_s3_prefix(tiny, tmp_path, s3_bucket):
    import fsspec

    from dcam.actors.models import load_backend

    ck = _save(tiny.model, tmp_path / "ck")
    images = _images(1)
    batch, _ = tiny.prepare(images, PROMPTS[:1])
    want = tiny.generate(batch, seed=5)
    opts = {k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")}
    fs = fsspec.filesystem("s3", **opts)
    for f in ck.iterdir():
        fs.put_file(str(f), f"{s3_bucket.name}/models/dg/{f.name}")
    for source in (str(ck), f"{s3_bucket.url}/models/dg"):
        be = load_backend({"backend": "diffusion_gemma", "source": source, "gen_steps": GEN_STEPS, "max_soft_tokens": 70,
                           "cache_dir": str(tmp_path / "cache"), "storage_options": opts, "device": "cpu"})
        assert isinstance(be, DiffusionGemmaBackend) and be.model.dtype == torch.float32
        assert all(not p.requires_grad for p in be.model.parameters())
        b, _ = be.prepare(images, PROMPTS[:1])
        got = be.generate(b, seed=5)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.commit_step, want.commit_step)
    assert be.model_id == f"{s3_bucket.name}/models/dg"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # copied once into the actor's cache


def test_remote_code_checkpoint_is_refused_unless_trusted(tiny, tmp_path):
    from dcam.actors.models import load_backend
    from dcam.actors.models.loading import check_remote_code

    ck = _save(tiny.model, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        load_backend({"backend": "diffusion_gemma", "source": str(ck)})
    check_remote_code(str(ck), trust_remote_code=True)  # explicit opt-in passes the check


def test_missing_source_and_foreign_checkpoints_are_refused(tiny, tmp_path):
    from dcam.actors.models import load_backend

    with pytest.raises(CheckpointError, match="source"):
        load_backend({"backend": "diffusion_gemma", "source": None})
    ck = _save(tiny.model, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type"):
        load_backend({"backend": "diffusion_gemma", "source": str(ck)})


def _word_tokenizer(words, V):
    """A tiny fast tokenizer with Gemma 4's image tokens and a chat template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for w in words:
        vocab[w] = len(vocab)
    vocab.update({"<|image>": V - 3, "<image|>": V - 2, "<|image|>": V - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{{ bos_token }}{% for m in messages %}<|turn> {{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}<turn|> "
                "{% endfor %}{% if add_generation_prompt %}<|turn> model {% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  additional_special_tokens=["<|image>", "<image|>", "<|image|>", "<|turn>", "<turn|>"])
    tok.chat_template = template
    return tok


def test_checkpoint_tokenizer_and_chat_template_build_gemma4_inputs(tiny, tmp_path):
    from dcam.actors.models import load_backend

    words = ["<|turn>", "<turn|>", "user", "model", "describe", "the", "image", "red", "box", "a"]
    ck = _save(tiny.model, tmp_path / "ck")
    tok = _word_tokenizer(words, tiny.vocab_size)
    tok.save_pretrained(str(ck))
    gc = json.loads((ck / "generation_config.json").read_text())
    gc["eos_token_id"] = [1, tok.convert_tokens_to_ids("<turn|>")]  # an IT checkpoint: <eos> and end-of-turn
    (ck / "generation_config.json").write_text(json.dumps(gc))
    be = load_backend({"backend": "diffusion_gemma", "source": str(ck), "gen_steps": GEN_STEPS, "max_soft_tokens": 70})
    assert be.chat_template and not isinstance(be.tok, ByteTokenizer)
    assert be.eos_id == tok.convert_tokens_to_ids("<turn|>") and set(be.eos_ids) == {1, be.eos_id}
    assert not be.is_content(1) and not be.is_content(be.eos_id)
    batch, errors = be.prepare(_images(2), ["describe the image", "describe <|image|>"], ["red box", None])
    assert list(errors) == [1] and errors[1].kind == "prompt"  # a second image placeholder in the prompt
    ids = batch.inputs["input_ids"][0].tolist()
    t = be.tok.convert_tokens_to_ids
    assert ids == ([2, t("<|turn>"), t("user"), be.boi_id] + [be.image_token_id] * 60 + [be.eoi_id]
                   + [t(w) for w in ("describe", "the", "image", "<turn|>", "<|turn>", "model")])
    assert batch.given_ids[0] == [t("red"), t("box")] and batch.spans[0].start == 4
    forced = be.forced_trajectory(batch)
    assert forced.ids[0, :3].tolist() == [t("red"), t("box"), be.eos_id]
    res = explain_batch(be, _images(1), ["describe the image"], {"m": _mid(be)}, responses=["red box"])[0]
    assert res.error is None and [m.token.strip() for m in res.maps["m"]] == ["red", "box"]
    assert res.response == "red box"


def test_every_method_preset_runs_with_faithfulness(tiny):
    """The pipeline's presets (Diffusion-CAM, parity, Grad-CAM at the last step, LLaVA-CAM at mid_norm2,
    TAM's logit lens at final_norm) on one given and one generated response, with deletion/insertion."""
    from dcam.actors.methods import PRESETS, probe_config

    methods = {name: probe_config(name, tiny, {"faithfulness_steps": 2}) for name in PRESETS}
    assert methods["llava_cam"].hook == "encoder.layers.0.pre_ffn_norm" and methods["tam"].hook == "final_norm"
    res = explain_batch(tiny, _images(2, shapes=((48, 80),)), PROMPTS[:2], methods, responses=["red", None])
    assert res[0].response_source == "given" and res[1].response_source == "generated"
    assert [m.token for m in res[0].maps["diffusion_cam"]] == ["r", "e", "d"]
    for r in res:
        assert r.error is None
        for name in PRESETS:
            for m in r.maps.get(name, []):
                assert m.raw_map.shape == (6, 10) and np.isfinite(m.raw_map).all()
                assert 0 <= m.deletion_auc <= 1 and 0 <= m.insertion_auc <= 1


def test_conf_model_yaml_builds_the_backend(tiny, tmp_path):
    from dcam.actors.models import load_backend
    from dcam.pipeline.config import load_config, to_dict

    ck = _save(tiny.model, tmp_path / "ck")
    cfg = to_dict(load_config("run", ["model=diffusion_gemma", f"model.source={ck}", "model.max_soft_tokens=70",
                                      "model.gen_steps=2", "model.noise_seed=3"]))["model"]
    assert cfg["backend"] == "diffusion_gemma" and cfg["trust_remote_code"] is False
    be = load_backend(cfg)
    assert (be.gen_steps, be.noise_seed, be.image_processor.max_soft_tokens) == (2, 3, 70)
    assert be.model.dtype == torch.float32 and be.device.type == "cpu"
