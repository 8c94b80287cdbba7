"""Helpers for the LaViDa / LLaDA-V tests (not a test module): the vendored reference fixtures, the
tiny tokenizer and test images they were made with, seeded native models and tiny checkpoints in
the public layout (reference key names, config.json with auto_map, tokenizer files)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from seeded_weights import seeded_weights

FIXTURES = Path(__file__).parent / "fixtures"
CHAT_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                 "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                 "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                 "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")
REAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
            "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
SMALL_IDS = {k: 256 + i for i, k in enumerate(REAL_IDS)}  # the same tokens in a 320-id vocabulary
AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def fixture(name: str) -> dict:
    with open(FIXTURES / name) as f:
        return json.load(f)


def reference_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """The fixtures' deterministic RGB image (smooth gradients and a checker), H x W x 3 uint8."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = np.random.default_rng(seed).uniform(0.5, 3.0, 3)
    r = 127.5 * (1 + np.sin(a * xx / max(w, 1) * 6.28 + b))
    g = 127.5 * (1 + np.cos(c * yy / max(h, 1) * 6.28))
    bl = 255.0 * (((xx // max(1, w // 7)) + (yy // max(1, h // 5))) % 2)
    return np.stack([r, g, bl], -1).clip(0, 255).astype(np.uint8)


def llada_tokenizer(special_ids: dict[str, int] = REAL_IDS, save_dir: str | None = None):
    """Byte-level BPE without merges (byte b = id b) plus LLaDA's special tokens at the given ids and
    LLaDA-8B-Instruct's chat template. Adds no BOS when encoding, like LLaDA's tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    vocab.update(special_ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_ids])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    if save_dir:
        fast.save_pretrained(save_dir)
    return fast


def reference_names(patterns: dict[str, int], native_keys, rules) -> dict[str, str]:
    """{reference key: native key}: the vendored reference key patterns ({i} = a block index)
    expanded and mapped through the backend's rules; only keys that land on a native parameter."""
    native = set(native_keys)
    out = {}
    for p in patterns:
        for i in range(64) if "{i}" in p else [None]:
            ref = p.replace("{i}", str(i)) if i is not None else p
            name = _map(ref, rules)
            if name in native:
                out[ref] = name
    return out


def _map(key, rules):
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def lavida_config(vocab=320, d=32, layers=2, heads=4, mlp=64, tower_heads=4, **mm) -> dict:
    """config.json of a LaViDa checkpoint (OLMo-style LLaDAConfig + mm_* fields + auto_map)."""
    c = dict(model_type="llava_llada", architectures=["LlavaLladaForMaskedDiffusion"], auto_map=AUTO_MAP,
             d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp, vocab_size=vocab,
             embedding_size=vocab, block_type="llama", activation_type="silu", layer_norm_type="rms",
             rms_norm_eps=1e-5, rope=True, rope_theta=500000.0, weight_tying=False, include_bias=False,
             max_sequence_length=4096, mask_token_id=SMALL_IDS["<|mdm_mask|>"],
             mm_projector_type="mlp2x_gelu", mm_hidden_size=24, mm_patch_merge_type="spatial_unpad",
             image_aspect_ratio="anyres", image_grid_pinpoints=[[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
             mm_spatial_pool_mode="bilinear", mm_vision_tower="google/siglip-so400m-patch14-384",
             vision_config={"num_attention_heads": tower_heads, "image_size": 384})
    c.update(mm)
    return c


def llada_v_config(vocab=320, d=32, layers=2, heads=4, mlp=64, tower_heads=4, **mm) -> dict:
    """config.json of a LLaDA-V checkpoint (HF-Llama-style + mm_* fields + auto_map)."""
    c = dict(model_type="llava_llada", architectures=["LlavaLLaDAModelLM"], auto_map=AUTO_MAP,
             hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=layers,
             intermediate_size=mlp, vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=500000.0,
             max_position_embeddings=8192, tie_word_embeddings=False, hidden_act="silu",
             mm_projector_type="mlp2x_gelu", mm_hidden_size=24, mm_patch_merge_type="spatial_unpad",
             image_aspect_ratio="anyres_max_4", image_grid_pinpoints="(1x1),...,(6x6)",
             mm_vision_tower="google/siglip2-so400m-patch14-384",
             vision_config={"num_attention_heads": tower_heads, "image_size": 384})
    c.update(mm)
    return c


def tower_shapes(hidden=24, mlp=40, layers=2, patch=14, side=27) -> dict[str, tuple[int, ...]]:
    """Native-named SigLIP tower shapes (used only to size a native model for writing checkpoints)."""
    s = {"vision_tower.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
         "vision_tower.embeddings.position_embedding.weight": (side * side, hidden),
         "vision_tower.encoder.layers.0.mlp.fc1.weight": (mlp, hidden)}
    s.update({f"vision_tower.encoder.layers.{i}.mlp.fc1.weight": (mlp, hidden) for i in range(layers)})
    return s


def native_model(kind: str, config: dict, tower_layers: int = 2):
    """The native module for a config.json dict, parameters uninitialised (they come from a state dict)."""
    from dcam.actors.models import lavida, llada_v
    from dcam.actors.models.llada_checkpoint import build_empty
    from dcam.actors.models.siglip_tower import tower_config

    vc = config.get("vision_config") or {}
    tc = tower_config(tower_shapes(hidden=config["mm_hidden_size"], layers=tower_layers),
                      heads=vc.get("num_attention_heads"), image_size=vc.get("image_size"))
    build = lavida._build_from_config if kind == "lavida" else llada_v._build_from_config
    return build_empty(build, config, tc, torch.float32)


def rules_of(kind: str):
    from dcam.actors.models import lavida, llada_v

    return lavida.REFERENCE_RULES if kind == "lavida" else llada_v.REFERENCE_RULES


def patterns_of(kind: str) -> dict[str, int]:
    return fixture(f"{kind}_keys.json")["key_patterns"]


def seeded_reference_state(kind: str, model, seed: int) -> dict[str, torch.Tensor]:
    """Reference-named seeded weights for every parameter of a native model (through the vendored patterns)."""
    names = reference_names(patterns_of(kind), model.state_dict().keys(), rules_of(kind))
    shapes = {ref: tuple(model.state_dict()[nat].shape) for ref, nat in names.items()}
    return seeded_weights(shapes, seed)


def load_reference_state(kind: str, model, state: dict[str, torch.Tensor]) -> None:
    """Copy reference-named tensors into the native model (strict: every parameter exactly once)."""
    rules = rules_of(kind)
    mapped = {_map(k, rules): v for k, v in state.items()}
    assert None not in mapped, [k for k in state if _map(k, rules) is None]
    model.load_state_dict(mapped, strict=True)


def write_checkpoint(directory, kind: str, config: dict, seed: int = 0, tower_layers: int = 2,
                     edit=None, special_ids=SMALL_IDS) -> str:
    """A tiny random checkpoint in the public layout: config.json (with auto_map), model.safetensors
    under the reference names, and the tokenizer. edit(native_model) may change weights first."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model = native_model(kind, config, tower_layers)
    state = seeded_reference_state(kind, model, seed)
    load_reference_state(kind, model, state)
    if edit is not None:
        edit(model)
    names = reference_names(patterns_of(kind), model.state_dict().keys(), rules_of(kind))
    native = model.state_dict()
    save_file({ref: native[nat].contiguous() for ref, nat in names.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    llada_tokenizer(special_ids, save_dir=str(directory))
    return str(directory)
