"""Helpers for the MMaDA / MAGVIT-v2 tests (not a test module): the tokenizer, images and tiny
configurations the vendored reference fixtures were made with, and tiny checkpoints in the public
layouts (an MMaDA LM directory with config.json + auto_map, and a MAGVIT-v2 directory).

Ids are MMaDA's real ones throughout: a dense 126349-entry tokenizer (bytes 0..255, LLaDA's special
tokens and MMaDA's reserved task tokens at their ids, filler tokens elsewhere), so image code c is
token 126349 + c (len(tokenizer) + c, as the reference computes it) in a 134656-id LM vocabulary."""
from __future__ import annotations

import json
import os

import torch
from llada_testing import CHAT_TEMPLATE, REAL_IDS, _map, fixture, reference_image  # noqa: F401
from seeded_weights import seeded_weights

TASK_IDS = {"<|soi|>": 126084, "<|eoi|>": 126085, "<|mmu|>": 126089}
TEXT_VOCAB = 126349  # len(tokenizer) of MMaDA-8B's tokenizer = the image code offset
LM_VOCAB = 134656  # MMaDA's new_vocab_size: 126464 LLaDA ids + 8192 codes
AUTO_MAP = {"AutoConfig": "configuration_mmada.MMadaConfig", "AutoModel": "modeling_mmada.MMadaModelLM"}
# the tiny MAGVIT-v2 encoder of the fixtures: GroupNorm(32) needs multiples of 32 channels; an
# attention block at 32 x 32 (the released model has none in its down path, only the middle one)
TINY_VQ = dict(ch=32, ch_mult=[1, 1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1, 1], attn_resolutions=[32],
               resolution=512, z_channels=13, in_ch=3, out_ch=3, dropout=0.0, double_z=False)


def mmada_tokenizer(save_dir: str | None = None):
    """Byte-level BPE without merges (byte b = id b), LLaDA's special tokens and MMaDA's task tokens at
    their real ids, `<|reserved_i|>` fillers up to id 126348, LLaDA-8B-Instruct's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    specials = {**REAL_IDS, **TASK_IDS}
    taken = set(specials.values())
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    vocab.update({f"<|reserved_{i}|>": i for i in range(256, TEXT_VOCAB) if i not in taken})
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    assert len(fast) == TEXT_VOCAB
    if save_dir:
        fast.save_pretrained(save_dir)
    return fast


def mmada_config(d=32, layers=2, heads=4, mlp=64, **extra) -> dict:
    """config.json of an MMaDA checkpoint (OLMo-style LLaDAConfig + MMaDA fields + auto_map)."""
    c = dict(model_type="mmada", architectures=["MMadaModelLM"], auto_map=AUTO_MAP,
             d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp,
             vocab_size=LM_VOCAB, embedding_size=LM_VOCAB, new_vocab_size=LM_VOCAB, llm_vocab_size=126464,
             codebook_size=8192, num_vq_tokens=1024, num_new_special_tokens=0, block_type="llama",
             activation_type="silu", layer_norm_type="rms", rms_norm_eps=1e-5, rope=True, rope_theta=500000.0,
             weight_tying=False, include_bias=False, max_sequence_length=4096, mask_token_id=126336)
    c.update(extra)
    return c


def vq_reference_shapes(vq: dict = TINY_VQ) -> dict[str, tuple[int, ...]]:
    """Reference-named encoder tensor shapes of a MAGVIT-v2 encoder configuration (what the
    reference's VQGANEncoder(**vq) state_dict holds, prefixed "encoder."), derived from the config
    the way the reference builds its modules."""
    ch, mult, nres = vq["ch"], vq["ch_mult"], vq["num_res_blocks"]
    s = {"encoder.conv_in.weight": (ch, vq["in_ch"], 3, 3), "encoder.conv_in.bias": (ch,)}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    res, cin = vq["resolution"], ch
    for lvl, m in enumerate(mult):
        for b in range(nres[lvl]):
            resblock(f"encoder.down.{lvl}.block.{b}", cin, ch * m)
            cin = ch * m
            if res in vq["attn_resolutions"]:
                attn(f"encoder.down.{lvl}.attn.{b}", cin)
        if lvl != len(mult) - 1:
            conv(f"encoder.down.{lvl}.downsample.conv", cin, cin, 3)
            res //= 2
    resblock("encoder.mid.block_1", cin, cin)
    attn("encoder.mid.attn_1", cin)
    resblock("encoder.mid.block_2", cin, cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, vq["z_channels"], 3)
    conv("encoder.quant_conv", vq["z_channels"], vq["z_channels"], 1)
    return s


def lfq_buffers(bits: int = 13) -> dict[str, torch.Tensor]:
    """The quantiser's persistent buffers as the reference registers them (LFQuantizer.__init__)."""
    idx = torch.arange(2 ** bits)
    binary = (idx.unsqueeze(1) >> torch.arange(bits - 1, -1, -1, dtype=torch.long)) & 1
    return {"quantize.embedding": binary.float() * 2 - 1, "quantize.power_vals": 2 ** torch.arange(bits - 1, -1, -1)}


def lm_reference_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """OLMo-layout LM tensor shapes of an MMaDA config (the reference MMadaModelLM's state_dict)."""
    d, f, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    s = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
         "model.transformer.ff_out.weight": (v, d)}
    for i in range(config["n_layers"]):
        b = f"model.transformer.blocks.{i}"
        s.update({f"{b}.attn_norm.weight": (d,), f"{b}.ff_norm.weight": (d,), f"{b}.q_proj.weight": (d, d),
                  f"{b}.k_proj.weight": (d, d), f"{b}.v_proj.weight": (d, d), f"{b}.attn_out.weight": (d, d),
                  f"{b}.ff_proj.weight": (f, d), f"{b}.up_proj.weight": (f, d), f"{b}.ff_out.weight": (d, f)})
    return s


def write_vq_checkpoint(directory, vq: dict = TINY_VQ, seed: int = 0, edit=None) -> str:
    """A tiny MAGVIT-v2 directory in the public (diffusers ModelMixin) layout: config.json and
    pytorch_model.safetensors with encoder.*, a decoder tensor and the quantiser buffers.
    edit(state) may change the reference-named encoder tensors first."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = seeded_weights(vq_reference_shapes(vq), seed)
    if edit is not None:
        edit(state)
    state.update(lfq_buffers(vq["z_channels"]))
    state["decoder.conv_in.weight"] = torch.zeros(vq["ch"], vq["z_channels"], 3, 3)  # skipped by dcam
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "pytorch_model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}, f)
    return str(directory)


def write_mmada_checkpoint(directory, config: dict | None = None, seed: int = 0, edit=None) -> str:
    """A tiny MMaDA LM directory in the public layout: config.json (model_type mmada, auto_map),
    model.safetensors under the OLMo-layout names, the tokenizer. edit(state) may change tensors."""
    from safetensors.torch import save_file

    config = config or mmada_config()
    os.makedirs(directory, exist_ok=True)
    state = seeded_weights(lm_reference_shapes(config), seed)
    if edit is not None:
        edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    mmada_tokenizer(save_dir=str(directory))
    return str(directory)
