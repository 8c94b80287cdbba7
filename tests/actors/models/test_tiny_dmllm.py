import numpy as np
import pytest
import torch

from dcam.actors import scenes
from dcam.actors.models.tiny_dmllm import (
    TinyDMLLM,
    TinyDMLLMConfig,
    UnknownWordError,
    WordTokenizer,
    denoise,
    encode_prompts,
    normalise_pixels,
)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return TinyDMLLM(TinyDMLLMConfig()).eval()


def _inputs(model, n, seed=21):
    items = scenes.make_scenes(seed, 0, n)
    tok = WordTokenizer(model.config.vocab)
    pixels = normalise_pixels(torch.from_numpy(np.stack([s.image for s in items])))
    return pixels, encode_prompts(tok, [s.prompt for s in items], model.config.max_prompt_len)


def test_greedy_generation_is_deterministic_and_batch_equals_singles(random_model):
    pixels, prompts = _inputs(random_model, 8)
    a = denoise(random_model, pixels, prompts)
    b = denoise(random_model, pixels, prompts)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    for i in range(8):
        s = denoise(random_model, pixels[i:i + 1], prompts[i:i + 1])
        assert torch.equal(s.ids[0], a.ids[i]) and torch.equal(s.commit_step[0], a.commit_step[i])
    assert (a.commit_step >= 0).all() and a.commit_step.max() == a.n_steps - 1


def test_sampling_needs_a_generator_and_is_reproducible_with_one(random_model):
    pixels, prompts = _inputs(random_model, 4)
    with pytest.raises(ValueError):
        denoise(random_model, pixels, prompts, temperature=0.5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = denoise(random_model, pixels, prompts, temperature=0.5, generator=g1)
    b = denoise(random_model, pixels, prompts, temperature=0.5, generator=g2)
    assert torch.equal(a.ids, b.ids)


def test_prefix_lm_blocks_prompt_and_image_from_seeing_the_response(random_model):
    pixels, prompts = _inputs(random_model, 2)
    L = random_model.config.response_len
    hidden = {}
    hook = random_model.blocks[-1].register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    c1 = torch.randint(3, 20, (2, L))
    c2 = torch.randint(3, 20, (2, L))
    random_model(pixels, prompts, c1)
    h1 = hidden["h"]
    random_model(pixels, prompts, c2)
    h2 = hidden["h"]
    hook.remove()
    cs = random_model.canvas_start
    assert torch.allclose(h1[:, :cs], h2[:, :cs], atol=1e-6)  # prompt + image unchanged
    assert not torch.allclose(h1[:, cs:], h2[:, cs:])  # canvas positions do change
    # without prefix_lm the image states do depend on the response (the test can fail)
    bidir = TinyDMLLM(TinyDMLLMConfig(prefix_lm=False)).eval()
    bidir.load_state_dict(random_model.state_dict())
    hook = bidir.blocks[-1].register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o))
    bidir(pixels, prompts, c1)
    g1 = hidden["h"]
    bidir(pixels, prompts, c2)
    hook.remove()
    assert not torch.allclose(g1[:, :cs], hidden["h"][:, :cs])


def test_prefix_cache_gives_the_full_forward_logits(random_model):
    pixels, prompts = _inputs(random_model, 6)
    prompts[0, :4] = random_model.config.vocab.index("[PAD]")  # left padding masks keys in both paths
    canvas = torch.randint(3, 20, (6, random_model.config.response_len))
    canvas[:, ::3] = random_model.config.vocab.index("[MASK]")
    with torch.no_grad():
        full = random_model(pixels, prompts, canvas)
        cache = random_model.prefix_cache(prompts, random_model.image_features(pixels))
        fast = random_model.canvas_logits(prompts, canvas, cache)
    assert full.abs().max() > 0.1 and torch.allclose(fast, full, atol=1e-5)
    with pytest.raises(ValueError, match="prefix_lm"):
        TinyDMLLM(TinyDMLLMConfig(prefix_lm=False)).prefix_cache(prompts, random_model.image_features(pixels))


def test_cached_denoising_equals_full_sequence_denoising():
    from dcam.actors.models.tiny_backend import TinyBackend

    model = TinyBackend.load().model  # trained: confident, realistic commit orders
    pixels, prompts = _inputs(model, 48, seed=22)
    for kw in ({}, {"block_length": 4}, {"forced_ids": denoise(model, pixels, prompts).ids.flip(1)}):
        a = denoise(model, pixels, prompts, **kw)
        b = denoise(model, pixels, prompts, use_prefix_cache=False, **kw)
        same = (a.ids == b.ids).all(1) & (a.commit_step == b.commit_step).all(1)
        # The two paths agree to float rounding (~1e-5 in logits), so a near-exact confidence tie
        # could in principle commit in another order on other BLAS kernels; a wrong cache would
        # change nearly every sample. 48/48 here, 500/500 on eval scenes.
        assert int(same.sum()) >= len(same) - 2, f"{int(same.sum())}/{len(same)} trajectories equal"


def test_empty_batch_denoises_to_an_empty_trajectory(random_model):
    pixels, prompts = _inputs(random_model, 1)
    for cached in (True, False):
        t = denoise(random_model, pixels[:0], prompts[:0], use_prefix_cache=cached)
        assert t.ids.shape == (0, random_model.config.response_len)


def test_forced_trajectory_commits_the_given_tokens(random_model):
    pixels, prompts = _inputs(random_model, 3)
    forced = torch.randint(3, 20, (3, random_model.config.response_len))
    t = denoise(random_model, pixels, prompts, forced_ids=forced)
    assert torch.equal(t.ids, forced)


def test_tokenizer_refuses_unknown_words_and_round_trips():
    tok = WordTokenizer(TinyDMLLMConfig().vocab)
    ids = tok.encode("a red circle and a blue square")
    assert tok.decode(ids + [tok.eos_id, tok.eos_id]) == "a red circle and a blue square"
    with pytest.raises(UnknownWordError):
        tok.encode("a red zebra")
    with pytest.raises(UnknownWordError):
        tok.encode("[MASK]")


def test_save_and_load_local_and_from_s3(tmp_path, random_model, s3_bucket):
    import fsspec

    random_model.save_pretrained(tmp_path / "ck")
    WordTokenizer(random_model.config.vocab).save_pretrained(str(tmp_path / "ck"))
    local = TinyDMLLM.from_pretrained(str(tmp_path / "ck"))
    fs = fsspec.filesystem("s3", key=s3_bucket.storage_options["key"], secret=s3_bucket.storage_options["secret"],
                           endpoint_url=s3_bucket.storage_options["endpoint_url"])
    for f in (tmp_path / "ck").iterdir():
        fs.put_file(str(f), f"{s3_bucket.name}/models/ck/{f.name}")
    from_s3 = TinyDMLLM.from_pretrained(f"{s3_bucket.url}/models/ck")
    for m in (local, from_s3):
        for (k, v), (_, w) in zip(random_model.state_dict().items(), m.state_dict().items()):
            assert torch.equal(v, w), k


def test_load_backend_copies_an_s3_checkpoint_into_model_cache_dir(tmp_path, random_model, s3_bucket):
    # Regression: the tiny backend ignored model.cache_dir (always ~/.cache/dcam/checkpoints).
    import fsspec

    from dcam.actors.models import load_backend

    random_model.save_pretrained(tmp_path / "ck")
    WordTokenizer(random_model.config.vocab).save_pretrained(str(tmp_path / "ck"))
    opts = {k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")}
    fs = fsspec.filesystem("s3", **opts)
    for f in (tmp_path / "ck").iterdir():
        fs.put_file(str(f), f"{s3_bucket.name}/models/ck2/{f.name}")
    be = load_backend({"backend": "tiny", "source": f"{s3_bucket.url}/models/ck2", "storage_options": opts,
                       "cache_dir": str(tmp_path / "cache"), "device": "cpu"})
    copies = list((tmp_path / "cache").iterdir())
    assert len(copies) == 1 and (copies[0] / "model.safetensors").exists()
    assert torch.equal(be.model.head.weight, random_model.head.weight)
