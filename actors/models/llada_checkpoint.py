"""Loading a LaViDa / LLaDA-V checkpoint in its public layout without its code.

The checkpoint directory holds config.json (model_type "llava_llada", with an `auto_map` that points
at the authors' modeling files), safetensors weights (one file or shards with an index) and the
tokenizer. dcam reads config.json as data, builds the native module, maps every tensor name
through the backend's rules (1:1: an unmapped tensor or a parameter without a tensor is an error)
and loads the tokenizer with trust_remote_code off. The `auto_map` code is never imported: the
backend declares the model_types it implements and `loading.check_remote_code` accepts the model
config's auto_map for those types only.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from dcam.actors.models.llada_lm import map_key
from dcam.actors.models.loading import CheckpointError, check_remote_code, resolve_checkpoint
from dcam.actors.models.siglip_tower import tower_config


def read_config(local: str) -> dict:
    path = os.path.join(local, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in checkpoint directory {local}")
    with open(path) as f:
        return json.load(f)


def weight_files(local: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(local, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {local} (dcam loads safetensors only: no pickle)")
    return files


def tensor_shapes(files: list[str], rules) -> dict[str, tuple[int, ...]]:
    """Native name -> shape of every tensor in the checkpoint (header reads only). Raises on names no rule maps."""
    from safetensors import safe_open

    shapes, unmapped = {}, []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                name = map_key(k, rules)
                if name is None:
                    unmapped.append(k)
                else:
                    shapes[name] = tuple(sf.get_slice(k).get_shape())
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} checkpoint tensor(s) match no key rule of this backend, e.g. "
                              f"{unmapped[:5]} (wrong model=? or an unsupported variant)")
    return shapes


def load_weights(model: torch.nn.Module, files: list[str], rules) -> None:
    """Copy every checkpoint tensor into its native parameter; exactly one tensor per parameter."""
    from safetensors import safe_open

    params = dict(model.state_dict())
    seen = set()
    with torch.no_grad():
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    name = map_key(k, rules)
                    if name not in params:
                        raise CheckpointError(f"checkpoint tensor {k} -> {name}: no such parameter")
                    t = sf.get_tensor(k)
                    if tuple(t.shape) != tuple(params[name].shape):
                        raise CheckpointError(f"checkpoint tensor {k} has shape {tuple(t.shape)}, "
                                              f"the model expects {tuple(params[name].shape)}")
                    params[name].copy_(t)
                    seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) have no tensor in the checkpoint, e.g. {missing[:5]}")


def reset_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers a meta-device build left empty: RoPE inverse frequencies
    and SigLIP's position ids."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

    for m in model.modules():
        if isinstance(m, LlamaRotaryEmbedding):
            inv_freq, m.attention_scaling = m.compute_default_rope_parameters(m.config)
            m.inv_freq.copy_(inv_freq)
            m.original_inv_freq.copy_(inv_freq)
        elif isinstance(m, SiglipVisionEmbeddings):
            m.position_ids.copy_(torch.arange(m.num_positions, device=m.position_ids.device).expand((1, -1)))


def build_empty(build, config: dict, tower_cfg, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """The native module with uninitialised parameters (no random init of billions of parameters that
    the checkpoint overwrites) and its non-persistent buffers computed."""
    with torch.device("meta"):
        model = build(config, tower_cfg, dtype)
    model = model.to_empty(device=device)
    reset_buffers(model)
    return model


def load_multimodal(model_cfg: dict, model_types: tuple[str, ...], build, rules, device: str, dtype: torch.dtype,
                    backend: str):
    """(model, tokenizer, local dir, source) for `model_cfg["source"]` (local dir, fsspec URL, HF cache id)."""
    from transformers import AutoTokenizer

    source = model_cfg.get("source")
    if not source:
        raise CheckpointError(f"model.source is required for the {backend} backend (a local dir, an fsspec URL such "
                              "as s3://bucket/prefix, or a hub id already in the local HF cache)")
    if model_cfg.get("trust_remote_code"):
        raise CheckpointError(f"the {backend} backend is native: it never runs checkpoint code "
                              "(model.trust_remote_code must stay false)")
    local = resolve_checkpoint(str(source), cache_dir=model_cfg.get("cache_dir"),
                               storage_options=model_cfg.get("storage_options"), hf_cache_dir=model_cfg.get("hf_cache_dir"))
    check_remote_code(local, False, native_model_types=model_types)
    config = read_config(local)
    if config.get("model_type") not in model_types:
        raise CheckpointError(f"checkpoint {source} has model_type {config.get('model_type')!r}; the {backend} "
                              f"backend loads {list(model_types)}")
    files = weight_files(local)
    shapes = tensor_shapes(files, rules)
    vc = config.get("vision_config") or {}
    try:
        tc = tower_config(shapes, heads=vc.get("num_attention_heads"), image_size=vc.get("image_size"))
        model = build_empty(build, config, tc, dtype, device)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {source}: {type(e).__name__}: {e}") from None
    load_weights(model, files, rules)
    tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
    return model.to(device), tok, local, source
