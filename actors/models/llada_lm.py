"""The LLaDA-8B backbone, shared by dcam's LaViDa, LLaDA-V (and later MMaDA) backends.

LLaDA is a LLaMA-style transformer trained as a masked-diffusion LM: pre-RMSNorm blocks, RoPE,
SwiGLU MLP, untied LM head, *bidirectional* attention. So it is transformers' `LlamaModel` with
the causal mask replaced by an explicit 4-D additive mask, built here for every call:

* `padding_mask`: bidirectional, left-padding keys masked (LLaDA-V: the whole sequence is
  re-encoded at every denoising step);
(both boolean, True = may attend; SDPA takes them as they are)
* `prefix_dlm_mask`: LaViDa's prefix-DLM pattern: prefix queries (prompt + image) see only the
  prefix, canvas queries see prefix and canvas. Under it the prefix states do not depend on the
  canvas, which is what makes LaViDa's prefix KV cache exact.

Passing the mask explicitly matters: transformers 5 builds a causal mask unless given a 4-D one
(`LlamaAttention.is_causal` stays True even with `is_causal=False` in the config), and SDPA never
adds a causal triangle on top of a given mask.

Positions ignore left padding (a padded row gets exactly the RoPE positions it has alone), so a
batch equals its samples run one by one; the authors' code runs batch 1 only (its SDPA call drops
the padding mask altogether).

Checkpoint layouts (both map 1:1 onto this module's `state_dict`, see `map_state_dict`):
* OLMo layout (LLaDA's own modeling file; LaViDa, MMaDA): `model.transformer.wte`, `...blocks.{i}.
  {attn_norm,q_proj,k_proj,v_proj,attn_out,ff_norm,ff_proj,up_proj,ff_out}`, `ln_f`, `ff_out`;
* HF-Llama layout (LLaDA-V, after its rename_checkpoint.py): `model.embed_tokens`,
  `model.layers.{i}.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj,input_layernorm,
  post_attention_layernorm}`, `model.norm`, `lm_head`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# OLMo-layout names (LLaDA's modeling_llada.py) -> transformers Llama names, relative to the LM.
OLMO_RULES = (
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.(q|k|v)_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
)
# HF-Llama layout (LLaDA-V): already the native names.
LLAMA_RULES = (
    (r"^(model\.embed_tokens\.weight)$", r"\1"),
    (r"^(model\.norm\.weight)$", r"\1"),
    (r"^(lm_head\.weight)$", r"\1"),
    (r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm|"
     r"post_attention_layernorm)\.weight)$", r"\1"),
)


@dataclass(frozen=True)
class LladaLMConfig:
    """LLaDA-8B: 32 layers, d 4096, 32 heads (no GQA), SwiGLU 12288, vocab 126464, theta 5e5."""
    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192

    @classmethod
    def from_olmo(cls, c: dict) -> LladaLMConfig:
        """From LLaDA's OLMo-style config keys (LaViDa, MMaDA config.json)."""
        if c.get("block_type", "llama") != "llama" or c.get("activation_type", "silu") not in ("silu", "swiglu"):
            raise ValueError(f"unsupported LLaDA block: block_type={c.get('block_type')!r}, "
                             f"activation_type={c.get('activation_type')!r} (LLaDA-8B: llama, silu)")
        if c.get("include_bias") or c.get("include_qkv_bias") or c.get("scale_logits") or c.get("input_emb_norm"):
            raise ValueError("unsupported LLaDA options: biases, scale_logits and input_emb_norm are off in LLaDA-8B")
        vocab = int(c.get("embedding_size") or c["vocab_size"])
        return cls(vocab_size=vocab, hidden_size=int(c["d_model"]), intermediate_size=int(c["mlp_hidden_size"]),
                   num_layers=int(c["n_layers"]), num_heads=int(c["n_heads"]),
                   num_kv_heads=int(c.get("n_kv_heads") or c["n_heads"]),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)), rope_theta=float(c.get("rope_theta", 10000.0)),
                   max_position_embeddings=int(c.get("max_sequence_length", 8192)))

    @classmethod
    def from_llama(cls, c: dict) -> LladaLMConfig:
        """From HF-Llama-style config keys (LLaDA-V config.json)."""
        return cls(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                   intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                   num_heads=int(c["num_attention_heads"]),
                   num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)), rope_theta=float(c.get("rope_theta", 10000.0)),
                   max_position_embeddings=int(c.get("max_position_embeddings", 8192)))


class PrefixKV:
    """A read-only prefix KV cache in the shape transformers' attention expects (`update`).

    Recording: the first pass stores each layer's (rotated) keys and values. Replaying: later passes
    see [prefix K/V | their own K/V] and store nothing, so every canvas-only denoising step reads
    the same prefix (LaViDa's generate computes the prefix once with use_cache=True)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)

    def select(self, rows: torch.Tensor) -> PrefixKV:
        """The cache of the given batch rows (one row may repeat)."""
        out = PrefixKV()
        out.keys = {i: k[rows] for i, k in self.keys.items()}
        out.values = {i: v[rows] for i, v in self.values.items()}
        out.recording = False
        return out


class LladaLM(nn.Module):
    """transformers `LlamaModel` (bidirectional via explicit masks) + untied LM head."""

    def __init__(self, config: LladaLMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = config
        hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                         num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                         rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                         attention_bias=False, mlp_bias=False, hidden_act="silu", tie_word_embeddings=False,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
        hf._attn_implementation = "sdpa"
        self.model = LlamaModel(hf).to(dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        return self.model.rotary_emb(h, position_ids=positions)

    def run_layers(self, h: torch.Tensor, mask: torch.Tensor, rope, start: int = 0, stop: int | None = None,
                   cache: PrefixKV | None = None, taps: dict | None = None) -> torch.Tensor:
        """Blocks start..stop-1 over h (B, T, D). taps: {layer index: callback(i, h_out)} after each block."""
        stop = len(self.layers) if stop is None else stop
        for i in range(start, stop):
            h = self.layers[i](h, attention_mask=mask, position_embeddings=rope, cache=cache)
            if taps and i in taps:
                h = taps[i](i, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head of hidden states (B, T, D) -> (B, T, V)."""
        return self.lm_head(self.model.norm(h))


# -- masks and positions ----------------------------------------------------------------------------
def positions(valid: torch.Tensor, canvas_len: int = 0) -> torch.Tensor:
    """(B, T + L) RoPE positions: prefix tokens count only valid (non-padding) tokens before them;
    the canvas continues after the last valid prefix token (a left-padded row = the row alone)."""
    n = valid.long().cumsum(-1)
    pre = (n - 1).clamp(min=0)
    can = n[:, -1:] + torch.arange(canvas_len, device=valid.device)[None]
    return torch.cat([pre, can], dim=1)


def prefix_dlm_mask(valid: torch.Tensor, canvas_len: int, queries: str = "all") -> torch.Tensor:
    """LaViDa's prefix-DLM mask over [prefix (T) | canvas (L)], bool (B, 1, Q, K), True = may attend:
    every query sees the valid prefix keys; canvas keys are seen by canvas queries only. queries:
    "all" (T+L query rows), "prefix" (T rows, the KV-cache pass) or "canvas" (L rows, a cached step).
    Every row sees at least the sample's valid prefix, so no softmax row is empty."""
    B, T = valid.shape
    keys = torch.cat([valid.bool(), torch.ones(B, canvas_len, dtype=torch.bool, device=valid.device)], 1)
    is_canvas_key = torch.arange(T + canvas_len, device=valid.device) >= T
    rows = {"all": torch.arange(T + canvas_len), "prefix": torch.arange(T), "canvas": torch.arange(T, T + canvas_len)}
    q = rows[queries].to(valid.device)
    allowed = keys[:, None, :] & ~(is_canvas_key[None, None, :] & (q[None, :, None] < T))
    if queries == "prefix":
        allowed = allowed[..., :T]
    return allowed[:, None]


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Fully bidirectional, padding keys masked (LLaDA-V): bool (B, 1, 1, K), broadcast over queries
    (a key-padding mask lets SDPA use its fused kernels instead of a (Q, K) mask per sample)."""
    return valid.bool()[:, None, None, :]


# -- checkpoint key mapping -------------------------------------------------------------------------
def map_key(key: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def map_state_dict(state: dict, rules, prefix: str = "") -> tuple[dict, list[str]]:
    """(native state dict with `prefix` + mapped names, unmapped source keys)."""
    out, left = {}, []
    for k, v in state.items():
        name = map_key(k, rules)
        if name is None:
            left.append(k)
        else:
            out[prefix + name] = v
    return out, left
