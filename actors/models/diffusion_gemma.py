"""Backend protocol implementation for DiffusionGemma (transformers' native `DiffusionGemmaForBlockDiffusion`).

The model in one paragraph: a causal *encoder* (Gemma 4 text stack + Gemma 4 vision tower) reads
prompt + image soft tokens once and leaves its keys/values in a KV cache; a bidirectional *decoder*
that shares the encoder's text weights denoises a canvas of `canvas_length` response tokens,
attending to that cache (read-only) and to itself. It is a *uniform-noise* discrete diffusion model,
not a masked one: the canvas starts as random vocabulary tokens; every step samples a token per
position, the entropy-bound sampler accepts the lowest-entropy positions (sum of their entropies
minus the largest <= entropy_bound), every other position is re-noised with fresh random tokens, and
the step's (temperature-scaled) logits are fed back as self-conditioning. The answer is the argmax
of the last step's logits; early stopping when the argmax is stable and the mean entropy is low.

How dcam maps that onto the protocol
------------------------------------
* `generate` re-implements `DiffusionGemmaGenerationMixin.generate` for one canvas (the mixin exposes
  no per-step states), call for call: same encoder call and masks, same decoder forward, linear
  temperature schedule, multinomial sample, entropy-bound acceptance, re-noising, stable-and-confident
  stopping. Random draws come from one `torch.Generator` per sample seeded with `seed`, drawn in the
  mixin's order, so a batch equals its samples run alone and a single sample reproduces
  `model.generate` after `torch.manual_seed(seed)` token for token (tested).
* Commit step. Nothing is ever final in a uniform-noise sampler, so a position's *commit step* is the
  first step from which it stayed accepted, with its final token, in every later step (the step whose
  prediction put it in the canvas for good); positions that never settle that way commit at the
  sample's last step (the argmax read-out). With that definition the canvas `Generation.state_before(s)`
  builds (committed tokens kept, the rest replaced) agrees with the real decoder input of step s at
  every committed position (tested against the recorded inputs); positions that were accepted only
  transiently at step s-1 are shown as noise.
* "Not yet committed" positions: `mask_id` is the sentinel -1 (never a real token id). The attribution
  pass replaces it with a fixed uniform-noise canvas (seeded by `noise_seed`, the same for every
  sample), i.e. the model's own notion of an undecided position. The decoder runs with zero
  self-conditioning (the form of the first denoising step, which the model is trained on through
  self-conditioning dropout); the trajectory's per-step self-conditioning logits are not replayed.
* `forced_trajectory` runs the same loop with the sampled tokens replaced by the given response
  (response, end-of-turn, pad...): the model's own entropies decide which positions are accepted
  when, which yields the commit order of the given text under the model's confidence schedule.
* Structural validity: the image tokens live only in the encoder stream, so only encoder hooks give
  a map. The decoder reads the encoder through the K/V of each encoder layer, so an encoder state
  reaches the canvas logits only if a later layer's K/V are computed from it: the output of the last
  encoder layer, its internals and the encoder's final norm never do (gradients would be
  identically zero); asking for their gradient raises StructuralStateError. Decoder hooks hold no
  image span: `actors.probe.grid.slice_grid` raises StructuralStateError for them.

Hook points (stream in brackets)
--------------------------------
encoder.embed [encoder]                   LM input: token embeddings with the image soft tokens scattered in
encoder.layers.{i}.in / .out [encoder]    residual stream entering / leaving encoder layer i
encoder.layers.{i}.input_norm, .attn, .post_attn_norm, .pre_ffn_norm, .mlp [encoder]
final_norm [encoder]                      the encoder's final norm (TAM's logit lens; no gradient path)
decoder.embed [decoder]                   decoder input (token embeddings after self-conditioning)
decoder.layers.{i}.in / .out / ... [decoder], decoder.final_norm [decoder]
named_hooks: mid = output of encoder layer n_layers//2 - 1; mid_norm2 = its pre-FFN norm (the
normalised residual stream after attention, the analogue of LLaMA's `post_attention_layernorm`
that LLaVA-CAM hooks; Gemma's own `post_attention_layernorm` normalises the attention *delta*).

Inputs are built as Gemma4Processor builds them (chat template with the user turn [image, prompt];
the image placeholder expanded to <boi> + n x <image> + <eoi>; Gemma 4 image processor: aspect-ratio
resize, 16-px patches, k x k average pooling into row-major soft tokens), from the checkpoint's
tokenizer, chat template and image-processor config, without instantiating Gemma4Processor (its video
part needs torchvision). Checkpoints without a tokenizer (the tiny random test model) use
`ByteTokenizer` and the plain layout <bos> <boi> <image> x n <eoi> prompt.

Cost: the vision tower runs once per sample, in `prepare` (its soft tokens are kept in the batch and
fed to the encoder as `mm_encoder_outputs`); it is never in an attribution graph, as in the tiny
backend. The encoder does not see the canvas, so in the attribution pass every layer below the hooked
one runs once per distinct sample without a graph; the hidden state is then expanded to one row per
(sample, token) and the graph starts there.
"""
from __future__ import annotations

import json
import logging
import os
import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dcam.actors.models.protocol import (
    AttributionOutput,
    Backend,
    Generation,
    ImageSpan,
    PreparedBatch,
    SampleError,
    StructuralStateError,
)
from dcam.actors.models.remasking import order_lowest_first

log = logging.getLogger(__name__)

NOISE = -1  # mask_id: "not committed yet"; replaced by the fixed noise canvas in the attribution pass
LAYER_PARTS = ("in", "out", "input_norm", "attn", "post_attn_norm", "pre_ffn_norm", "mlp")
_PART_MODULE = {"input_norm": "input_layernorm", "attn": "self_attn", "post_attn_norm": "post_attention_layernorm",
                "pre_ffn_norm": "pre_feedforward_layernorm", "mlp": "mlp"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# -- the tiny random model used by tests and examples -----------------------------------------------
def tiny_config(vocab_size: int = 320, canvas_length: int = 16, **text_overrides):
    """A DiffusionGemma config that builds on CPU in well under a second (~0.3M parameters): text
    hidden 64, 2 layers [sliding, full], 2 experts top-1, vision hidden 64, 2 layers, patch 4,
    pooling 2. Vocabulary layout matches `ByteTokenizer` (pad 0, eos 1, bos 2, bytes 3..258) with
    boi / eoi / image as the last three ids."""
    from transformers import DiffusionGemmaConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32,
                layer_types=["sliding_attention", "full_attention"], sliding_window=32, num_experts=2,
                top_k_experts=1, moe_intermediate_size=64, use_bidirectional_attention="vision",
                max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    text.update(text_overrides)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=vocab_size - 3,
                                eoi_token_id=vocab_size - 2, image_token_id=vocab_size - 1, canvas_length=canvas_length)


class ByteTokenizer:
    """UTF-8 byte tokenizer for checkpoints without one (the tiny random test model): pad 0, eos 1,
    bos 2, byte b -> 3 + b; the config's boi / eoi / image ids are special."""

    def __init__(self, boi_id: int, eoi_id: int, image_id: int, vocab_size: int):
        if vocab_size < 262:
            raise ValueError(f"ByteTokenizer needs a vocabulary of at least 262 ids, got {vocab_size}")
        self.pad_token_id, self.eos_token_id, self.bos_token_id = 0, 1, 2
        self.specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", boi_id: "<boi>", eoi_id: "<eoi>", image_id: "<image>"}
        self.all_special_ids = sorted(self.specials)
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [3 + b for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in (int(t) for t in ids):
            if 3 <= i < 259:
                buf.append(i - 3)
                continue
            if buf:
                out.append(buf.decode("utf-8", "replace"))
                buf = bytearray()
            if not skip_special_tokens:
                out.append(self.specials.get(i, f"<{i}>"))
        if buf:
            out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


# -- the backend ------------------------------------------------------------------------------------
class DiffusionGemmaBackend(Backend):
    """Hook points: see the module docstring (`hook_points()` lists them)."""

    def __init__(self, model, tokenizer=None, image_processor=None, chat_template: str | None = None,
                 model_id: str = "diffusion-gemma", device: str = "cpu", gen_steps: int | None = None,
                 t_min: float | None = None, t_max: float | None = None, entropy_bound: float | None = None,
                 stability_threshold: int | None = None, confidence_threshold: float | None = None,
                 response_len: int | None = None, noise_seed: int = 0, eos_id: int | None = None,
                 max_soft_tokens: int | None = None, use_chat_template: bool = True):
        """tokenizer: a transformers tokenizer (None = ByteTokenizer, for tiny test models);
        image_processor: a Gemma 4 image processor (None = Gemma4ImageProcessorPil from the vision config
        with `max_soft_tokens`, default 280 as in the Gemma 4 processor); chat_template: a Jinja chat
        template (None = the tokenizer's own, if any). Inputs are built the way Gemma4Processor builds them
        (the template's image placeholder expanded to <boi> + n x <image> + <eoi>) without needing the
        processor class itself (which needs torchvision for its video part)."""
        from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaForBlockDiffusion

        if not isinstance(model, DiffusionGemmaForBlockDiffusion):
            raise TypeError(f"DiffusionGemmaBackend needs a DiffusionGemmaForBlockDiffusion, got {type(model).__name__}")
        self.model = model.eval().to(device)
        self.model.requires_grad_(False)  # frozen: gradients are taken w.r.t. activations only
        self.device = torch.device(device)
        self.model_id = model_id
        c = model.config
        self.config, self.text_config = c, c.get_text_config()
        self.n_layers = self.text_config.num_hidden_layers
        self.vocab_size = self.text_config.vocab_size
        self.image_token_id, self.boi_id, self.eoi_id = c.image_token_id, c.boi_token_id, c.eoi_token_id
        self.tok = tokenizer if tokenizer is not None else ByteTokenizer(self.boi_id, self.eoi_id, self.image_token_id,
                                                                         self.vocab_size)
        self.pooling = c.vision_config.pooling_kernel_size
        self.image_processor = self._image_processor(image_processor, max_soft_tokens)
        self._init_chat_template(chat_template, use_chat_template)
        gc, _ = model._prepare_generation_config(None)  # the checkpoint's generation_config.json + defaults
        self._init_generation(gc, gen_steps, t_min, t_max, entropy_bound, stability_threshold, confidence_threshold)
        self.eos_id, self.eos_ids = self._end_ids(gc, eos_id)
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.text_config.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.bos_id = self.text_config.bos_token_id
        self.mask_id = NOISE
        self.response_len = int(response_len or c.canvas_length)
        self.noise_seed = int(noise_seed)
        self._noise = torch.randint(0, self.vocab_size, (self.response_len,),
                                    generator=torch.Generator().manual_seed(self.noise_seed)).to(self.device)
        special = set(getattr(self.tok, "all_special_ids", []) or [])
        self._special = special | set(self.eos_ids) | {self.pad_id, self.image_token_id, self.boi_id, self.eoi_id, NOISE}
        self._named = self._named_hook_points()
        self.last_trace: dict | None = None  # per-step record of the latest generate / forced_trajectory

    def _image_processor(self, image_processor, max_soft_tokens: int | None):
        vc = self.config.vision_config
        if image_processor is None:
            from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

            return Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                           max_soft_tokens=max_soft_tokens or 280)
        if max_soft_tokens:
            image_processor.max_soft_tokens = int(max_soft_tokens)
        return image_processor

    def _init_chat_template(self, chat_template: str | None, use_chat_template: bool) -> None:
        template = chat_template or getattr(self.tok, "chat_template", None)
        usable = use_chat_template and template and not isinstance(self.tok, ByteTokenizer)
        self.chat_template = template if usable else None
        self._image_strs = None
        if self.chat_template:
            conv = self.tok.convert_ids_to_tokens
            self._image_strs = (getattr(self.tok, "image_token", None) or conv(self.image_token_id),
                                conv(self.boi_id), conv(self.eoi_id), conv(self.image_token_id))

    def _init_generation(self, gc, gen_steps, t_min, t_max, entropy_bound, stability_threshold,
                         confidence_threshold) -> None:
        """Generation parameters: ours where given, else the checkpoint's generation config."""
        self.gen_steps = int(gen_steps or gc.max_denoising_steps)
        self.t_min = float(t_min if t_min is not None else gc.t_min)
        self.t_max = float(t_max if t_max is not None else gc.t_max)
        self.entropy_bound = float(entropy_bound if entropy_bound is not None else gc.sampler_config.entropy_bound)
        self.stability_threshold = stability_threshold if stability_threshold is not None else gc.stability_threshold
        self.confidence_threshold = confidence_threshold if confidence_threshold is not None else gc.confidence_threshold

    def _end_ids(self, gc, eos_id: int | None) -> tuple[int, tuple[int, ...]]:
        """(first end id, every end id). An instruction model ends its answer with the end-of-turn
        token its chat template writes, so that one comes first when the config lists several."""
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.text_config.eos_token_id
        eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        if eos_id is None and self.chat_template and len(eos) > 1:
            in_template = [e for e in eos if (t := self.tok.convert_ids_to_tokens(e)) and t in self.chat_template
                           and t != getattr(self.tok, "bos_token", None)]
            eos_id = in_template[0] if in_template else None
        if eos_id is not None:
            eos = [int(eos_id)] + [e for e in eos if e != int(eos_id)]
        if not eos:
            raise ValueError("DiffusionGemma checkpoint defines no eos_token_id; set model.eos_id")
        return eos[0], tuple(eos)

    def _named_hook_points(self) -> dict[str, str]:
        mid = self.n_layers // 2 - 1 if self.n_layers >= 2 else None
        early = -(-self.n_layers // 4) - 1 if self.n_layers >= 1 else None  # block at a quarter of the depth
        named = ({"mid": f"encoder.layers.{mid}.out", "mid_norm2": f"encoder.layers.{mid}.pre_ffn_norm"}
                 if mid is not None and mid >= 0 else {"mid": "encoder.embed", "mid_norm2": "encoder.embed"})
        named["early"] = f"encoder.layers.{early}.out" if early is not None and early >= 0 else "encoder.embed"
        return named

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "DiffusionGemmaBackend":
        """`model_cfg` keys: source (local dir | fsspec URL | hub id from the local HF cache), cache_dir,
        storage_options, hf_cache_dir, trust_remote_code, model_id, gen_steps, t_min, t_max, entropy_bound,
        stability_threshold, confidence_threshold, response_len, noise_seed, eos_id, max_soft_tokens,
        use_chat_template, attn_implementation, tokenizer ("auto" | "byte")."""
        from transformers import AutoConfig
        from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaForBlockDiffusion

        from dcam.actors.models.loading import CheckpointError, check_remote_code, resolve_checkpoint

        source = model_cfg.get("source")
        if not source:
            raise CheckpointError("model.source is required for the diffusion_gemma backend (a local dir, an fsspec "
                                  "URL such as s3://bucket/prefix, or a hub id already in the local HF cache)")
        trust = bool(model_cfg.get("trust_remote_code", False))
        local = resolve_checkpoint(str(source), cache_dir=model_cfg.get("cache_dir"),
                                   storage_options=model_cfg.get("storage_options"),
                                   hf_cache_dir=model_cfg.get("hf_cache_dir"))
        check_remote_code(local, trust)
        with open(os.path.join(local, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "diffusion_gemma" and not trust:
            raise CheckpointError(f"checkpoint {source} has model_type {model_type!r}; the diffusion_gemma backend "
                                  "loads DiffusionGemma checkpoints (model_type 'diffusion_gemma')")
        kw = dict(local_files_only=True, dtype=dtype)
        if str(device).startswith("cuda"):
            kw["device_map"] = device  # load straight onto the GPU (no full copy in host memory first)
        if model_cfg.get("attn_implementation"):
            kw["attn_implementation"] = model_cfg["attn_implementation"]
        if trust:  # only ever on explicit request
            from transformers import AutoModelForMultimodalLM

            AutoConfig.from_pretrained(local, local_files_only=True, trust_remote_code=True)
            model = AutoModelForMultimodalLM.from_pretrained(local, trust_remote_code=True, **kw)
        else:
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(local, **kw)
        tokenizer, image_processor, chat_template = _load_text_and_image_processing(
            local, model, model_cfg.get("tokenizer", "auto"), trust)
        keys = ("gen_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold",
                "response_len", "eos_id", "max_soft_tokens")
        opts = {k: model_cfg[k] for k in keys if model_cfg.get(k) is not None}
        if model_cfg.get("noise_seed") is not None:
            opts["noise_seed"] = int(model_cfg["noise_seed"])
        if model_cfg.get("use_chat_template") is not None:
            opts["use_chat_template"] = bool(model_cfg["use_chat_template"])
        return cls(model, tokenizer=tokenizer, image_processor=image_processor, chat_template=chat_template,
                   device=device, model_id=model_cfg.get("model_id") or _default_model_id(source), **opts)

    # -- inputs -----------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        if isinstance(self.tok, ByteTokenizer):
            return self.tok.encode(text)
        return list(self.tok.encode(text, add_special_tokens=False))

    def _encode_one(self, image: np.ndarray, prompt: str, response: str | None) -> dict:
        if not isinstance(prompt, str):
            raise SampleError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] not in (3, 4) or min(img.shape[:2]) < 1:
            raise SampleError("image", f"image must be HxWx3, got shape {tuple(img.shape)}")
        pil = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
        try:
            feats = self.image_processor(images=[pil], return_tensors="pt")
        except (ValueError, TypeError) as e:  # the image processor refused this image
            raise SampleError("image", f"image preprocessing failed: {e}") from None
        pv, pos = feats["pixel_values"], feats["image_position_ids"]
        n = int(feats["num_soft_tokens_per_image"][0])
        if self.chat_template:
            placeholder, boi, eoi, image = self._image_strs
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.tok.apply_chat_template(messages, chat_template=self.chat_template, add_generation_prompt=True,
                                                tokenize=False)
            if text.count(placeholder) != 1:
                raise SampleError("prompt", f"the chat template rendered {text.count(placeholder)} image placeholders "
                                            f"{placeholder!r} (expected 1; does the prompt contain one?)")
            text = text.replace(placeholder, boi + image * n + eoi)  # Gemma4Processor.replace_image_token
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        else:  # no template (tiny test models): <bos> <boi> <image> x n <eoi> prompt
            ids = ([self.bos_id] if self.bos_id is not None else []) + [self.boi_id] + [self.image_token_id] * n \
                + [self.eoi_id] + self._encode_text(prompt)
        valid = (pos[0] >= 0).all(-1)
        xy = pos[0][valid]
        rows, cols = (int(xy[:, 1].max()) + 1) // self.pooling, (int(xy[:, 0].max()) + 1) // self.pooling
        n_img = sum(1 for t in ids if t == self.image_token_id)
        if n_img != rows * cols:
            raise SampleError("image", f"{n_img} image tokens in the prompt but the soft-token grid is {rows}x{cols}")
        if len(ids) + self.response_len > self.text_config.max_position_embeddings:
            limit = self.text_config.max_position_embeddings
            raise SampleError("prompt", f"prompt + image take {len(ids)} tokens; with the {self.response_len}-token "
                                        f"canvas that exceeds the model's {limit} positions")
        r = None
        if response is not None:
            r = self._encode_text(response)
            if not r:
                raise SampleError("response", "given response is empty")
            if len(r) >= self.response_len:
                raise SampleError("response", f"response has {len(r)} tokens; the canvas holds {self.response_len - 1}")
        return dict(ids=ids, pixel_values=pv[0], position_ids=pos[0], rows=rows, cols=cols, response=r,
                    size=tuple(img.shape[:2]))

    def prepare(self, images, prompts, responses=None):
        responses = responses if responses is not None else [None] * len(images)
        errors, keep, enc = {}, [], []
        for i, (image, prompt, response) in enumerate(zip(images, prompts, responses)):
            try:
                enc.append(self._encode_one(image, prompt, response))
                keep.append(i)
            except SampleError as e:
                errors[i] = e
        T = max((len(e["ids"]) for e in enc), default=1)
        ids = torch.full((len(enc), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(enc), T), dtype=torch.long)
        spans = []
        for row, e in enumerate(enc):  # left padding keeps every token's distance to the canvas
            off = T - len(e["ids"])
            ids[row, off:] = torch.tensor(e["ids"])
            attn[row, off:] = 1
            where = (ids[row] == self.image_token_id).nonzero()[:, 0].numpy()
            if len(where) and (np.diff(where) == 1).all():
                spans.append(ImageSpan(stream="encoder", start=int(where[0]), rows=e["rows"], cols=e["cols"]))
            else:
                spans.append(ImageSpan(stream="encoder", start=int(where[0]) if len(where) else 0, rows=e["rows"],
                                       cols=e["cols"], index=where.reshape(e["rows"], e["cols"])))
        dtype = self.model.dtype
        counts = torch.tensor([e["rows"] * e["cols"] for e in enc], dtype=torch.long)
        D = self.text_config.hidden_size
        if enc:
            pv = torch.stack([e["pixel_values"] for e in enc]).to(self.device, dtype)
            pos = torch.stack([e["position_ids"] for e in enc]).to(self.device)
            with torch.no_grad():  # the vision tower runs once per sample, never in an attribution graph
                flat = self.model.model.encoder.get_image_features(pv, pos, return_dict=True).pooler_output
            feats = torch.zeros((len(enc), int(counts.max()), D), dtype=flat.dtype, device=self.device)
            feats[_valid(counts.to(self.device), feats.shape[1])] = flat
        else:
            pv, pos = torch.zeros(0, 1, 1, device=self.device, dtype=dtype), torch.zeros(0, 1, 2, dtype=torch.long)
            feats = torch.zeros((0, 1, D), dtype=dtype, device=self.device)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device),
                  "mm_token_type_ids": (ids == self.image_token_id).long().to(self.device),
                  "pixel_values": pv, "image_position_ids": pos.to(self.device),
                  "image_features": feats, "image_counts": counts.to(self.device)}
        batch = PreparedBatch(inputs=inputs, spans=spans, prompts=[prompts[i] for i in keep],
                              given_ids=[e["response"] for e in enc], image_sizes=[e["size"] for e in enc],
                              source_index=keep)
        return batch, errors

    # -- masks ------------------------------------------------------------------------------
    def _new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.text_config)

    def _encoder_masks(self, attention_mask, mm_token_type_ids, cache, position_ids) -> dict:
        """The 4-D masks `generate` builds before the prefill (causal; bidirectional over each image
        when the config says use_bidirectional_attention='vision'; padding)."""
        dummy = torch.empty((attention_mask.shape[0], attention_mask.shape[1], 0), dtype=self.model.dtype,
                            device=attention_mask.device)
        return self.model.model.encoder.create_masks_for_generate(
            config=self.config, inputs_embeds=dummy, attention_mask=attention_mask.bool(), cache=cache,
            position_ids=position_ids, mm_token_type_ids=mm_token_type_ids)

    def _positions(self, attention_mask: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder (B, T) and canvas (B, L) position ids that ignore left padding, so a padded row gets
        exactly the positions it has alone (for an unpadded row: arange, as `generate` uses)."""
        n = attention_mask.long().cumsum(-1)
        enc = (n - 1).clamp(min=0).to(torch.int32)
        dec = (n[:, -1:] + torch.arange(L, device=attention_mask.device)[None]).to(torch.int32)
        return enc, dec

    def _decoder_masks(self, attention_mask, cache, L: int) -> dict:
        dummy = torch.empty((attention_mask.shape[0], L, 1), dtype=torch.long, device=attention_mask.device)
        return self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.config, inputs_embeds=dummy, cache=cache,
            decoder_attention_mask=F.pad(attention_mask.bool(), (0, L), value=True))

    # -- denoising --------------------------------------------------------------------------
    def generate(self, batch, seed=0):
        return self._denoise(batch, seed, forced=None)

    def forced_trajectory(self, batch):
        L = self.response_len
        forced = torch.full((batch.size, L), self.pad_id, dtype=torch.long, device=self.device)
        for i, ids in enumerate(batch.given_ids):
            if ids is None:
                raise ValueError("forced_trajectory needs a given response for every sample")
            forced[i, :len(ids)] = torch.tensor(ids, device=self.device)
            forced[i, len(ids)] = self.eos_id
        return self._denoise(batch, self.noise_seed, forced=forced)

    def _temperature(self, cur_step: int) -> torch.Tensor:
        """LinearTemperatureScheduleLogitsProcessor (cur_step counts the steps *remaining*, N..1),
        computed as the mixin does (an int32 step tensor) so the logits match bit for bit."""
        cur = torch.tensor(cur_step, dtype=torch.int32, device=self.device)
        return self.t_min + ((self.t_max - self.t_min) * (cur / self.gen_steps))

    @torch.no_grad()
    def _denoise(self, batch: PreparedBatch, seed: int, forced: torch.Tensor | None) -> Generation:
        m, inp = self.model, batch.inputs
        B, T = inp["input_ids"].shape
        L, V, N = self.response_len, self.vocab_size, self.gen_steps
        dev = self.device
        # 1.a encoder prefill into the KV cache (exactly the mixin's call)
        cache = self._new_cache()
        enc_pos, dec_pos = self._positions(inp["attention_mask"], L)
        masks = self._encoder_masks(inp["attention_mask"], inp["mm_token_type_ids"], cache, enc_pos)
        m.model.encoder(input_ids=inp["input_ids"], attention_mask=masks, cache=cache, position_ids=enc_pos,
                        mm_encoder_outputs={"image": self._image_outputs(inp)},
                        mm_token_type_ids=inp["mm_token_type_ids"])
        # 1.b denoiser inputs: a uniform random canvas per sample, from that sample's own generator
        dec_masks = self._decoder_masks(inp["attention_mask"], cache, L)
        gens = [torch.Generator(device=dev).manual_seed(int(seed)) for _ in range(B)]
        canvas = torch.cat([torch.randint(0, V, (1, L), generator=g, device=dev) for g in gens])
        argmax, sc = canvas, None
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        last = torch.full((B,), N - 1, dtype=torch.long, device=dev)
        history = None
        acc_rec, tok_rec, in_rec = [], [], []
        emb_dtype = m.model.decoder.embed_tokens.weight.dtype
        for s in range(N):
            cur = N - s
            in_rec.append(canvas.clone())
            out = m(decoder_input_ids=canvas, self_conditioning_logits=sc, decoder_attention_mask=dec_masks,
                    cache=cache, decoder_position_ids=dec_pos)
            processed = out.logits / self._temperature(cur)
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
            active = (~finished).nonzero()[:, 0].tolist()
            if forced is None:
                denoised = canvas.clone()
                for i in active:
                    denoised[i] = torch.multinomial(probs[i], num_samples=1, generator=gens[i])[:, 0]
                new_argmax = processed.argmax(-1)
            else:
                denoised, new_argmax = forced, forced
            accept, new_canvas = self._accept_and_renoise(processed, denoised, canvas, active, gens)
            acc_rec.append(accept)
            tok_rec.append(denoised.clone())
            if self.stability_threshold is not None and self.confidence_threshold is not None:
                if finished.any():
                    new_argmax = torch.where(finished[:, None], argmax, new_argmax)
                    new_canvas = torch.where(finished[:, None], canvas, new_canvas)
                    processed = torch.where(finished[:, None, None], sc.float(), processed)
                stop, history = self._stop(new_argmax, processed, history)
                last = torch.where(~finished & stop, torch.full_like(last, s), last)
                finished = finished | stop
            sc = processed.to(emb_dtype)
            canvas, argmax = new_canvas, new_argmax
            if bool(finished.all()):
                break
        final = argmax.clone()
        commit = _commit_steps(torch.stack(acc_rec), torch.stack(tok_rec), final, last)
        self.last_trace = {"inputs": torch.stack(in_rec), "accepted": torch.stack(acc_rec),
                           "tokens": torch.stack(tok_rec), "last_step": last}
        gen = Generation(ids=final, commit_step=commit, n_steps=N, source="generated" if forced is None else "given")
        gen.final_step = last  # (B,) each row's last pass (early stopping): the `last_step` state
        return gen

    def _accept_and_renoise(self, processed, denoised, canvas, active: list[int], gens) -> tuple:
        """EntropyBoundSampler.accept_canvas (lowest-entropy positions while their cumulative entropy
        stays within the bound), then renoise_canvas: fresh uniform tokens wherever not accepted.
        Equal entropies are taken lowest position first (the mixin's unstable sort leaves that to the
        device), so which of two tied positions is accepted at the bound is deterministic."""
        entropy = torch.distributions.Categorical(logits=processed).entropy()
        order = order_lowest_first(entropy, descending=False)  # equal entropies: lowest position first
        sorted_h = entropy.gather(-1, order)
        sel = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= self.entropy_bound
        accept = torch.scatter(torch.zeros_like(sel), -1, order, sel)
        accepted = torch.where(accept, denoised, canvas)
        noise = canvas.clone()
        for i in active:
            noise[i] = torch.randint(0, self.vocab_size, (1, canvas.shape[1]), generator=gens[i], device=self.device)[0]
        return accept, torch.where(accept, accepted, noise)

    @staticmethod
    def _image_outputs(inp: dict):
        """The image soft tokens computed in `prepare`, in the form the encoder takes (`mm_encoder_outputs`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        flat = inp["image_features"][_valid(inp["image_counts"], inp["image_features"].shape[1])]
        return BaseModelOutputWithPooling(pooler_output=flat)

    def _stop(self, argmax, logits, history):
        """StableAndConfidentStoppingCriteria, row-wise (its state is the argmax history)."""
        k = int(self.stability_threshold)
        if k == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if history is None:
                history = torch.full((k, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (history == argmax[None]).all(-1).all(0)
            history = torch.roll(history, shifts=-1, dims=0)
            history[-1] = argmax
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        return stable & (entropy.mean(-1) < float(self.confidence_threshold)), history

    # -- attribution ------------------------------------------------------------------------
    def hook_points(self):
        pts = ["encoder.embed", "final_norm", "decoder.embed", "decoder.final_norm"]
        for stream in ("encoder", "decoder"):
            pts += [f"{stream}.layers.{i}.{p}" for i in range(self.n_layers) for p in LAYER_PARTS]
        return pts

    def named_hooks(self):
        return dict(self._named)

    def hook_stream(self, hook):
        if hook not in set(self.hook_points()):
            parts = ",".join(LAYER_PARTS)
            raise KeyError(f"unknown hook point {hook!r}; known: encoder.embed, final_norm, decoder.embed, "
                           f"decoder.final_norm, {{encoder,decoder}}.layers.<0..{self.n_layers - 1}>.{{{parts}}}")
        return "decoder" if hook.startswith("decoder.") else "encoder"

    def _split_of(self, hook: str) -> int:
        """Index of the first encoder layer that must run per attribution row (with a graph) for `hook`."""
        if hook == "encoder.embed":
            return 0
        if hook == "final_norm":
            return self.n_layers
        _, _, i, part = hook.split(".")
        return int(i) + 1 if part == "out" else int(i)

    def _reaches_canvas(self, hook: str) -> bool:
        """Whether an encoder state can change the canvas logits: only through K/V of a later layer."""
        if hook in ("encoder.embed",):
            return True
        if hook == "final_norm":
            return False
        _, _, i, part = hook.split(".")
        return part in ("in", "input_norm") or int(i) < self.n_layers - 1

    def _refuse_dead_hooks(self, enc_hooks: list[str]) -> None:
        dead = [h for h in enc_hooks if not self._reaches_canvas(h)]
        if dead:
            raise StructuralStateError(
                f"hook(s) {dead}: the DiffusionGemma decoder reads the encoder only through the K/V of each "
                f"encoder layer, so the encoder's last-layer output, its internals and the final norm never reach "
                f"the canvas logits (identically zero gradient); hook encoder.layers.<i>.out with "
                f"i < {self.n_layers - 1}")

    def attribution_forward(self, batch, rows, canvas, hooks, image_keep=None):
        m = self.model
        enc_lm = m.model.encoder.language_model
        for h in hooks:
            self.hook_stream(h)
        grad = torch.is_grad_enabled()
        enc_hooks = [h for h in hooks if not h.startswith("decoder.")]
        dec_hooks = [h for h in hooks if h.startswith("decoder.")]
        if grad:
            self._refuse_dead_hooks(enc_hooks)
        rows = rows.to(self.device)
        canvas = canvas.to(self.device)
        if ((canvas < 0) & (canvas != NOISE)).any() or (canvas >= self.vocab_size).any():
            raise ValueError("canvas holds ids outside the vocabulary (only -1 = not yet committed is allowed)")
        inp = batch.inputs
        n_rows, L = canvas.shape
        if image_keep is None:  # the encoder does not see the canvas: one pass per distinct sample below the hook
            uniq, inv = torch.unique(rows, return_inverse=True)
        else:
            uniq, inv = rows, torch.arange(n_rows, device=self.device)
        pos_u, _ = self._positions(inp["attention_mask"][uniq], L)
        pos_n, dec_pos = self._positions(inp["attention_mask"][rows], L)
        cache = self._new_cache()
        masks_u = self._encoder_masks(inp["attention_mask"][uniq], inp["mm_token_type_ids"][uniq], cache, pos_u)
        masks_n = self._encoder_masks(inp["attention_mask"][rows], inp["mm_token_type_ids"][rows], cache, pos_n)
        split = min([self._split_of(h) for h in enc_hooks], default=self.n_layers)
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # the graph starts at the hooked layer: vision tower and lower layers are not explained
            x = self._encoder_embeddings(batch, uniq, rows, image_keep)
            pe_u = {t: enc_lm.rotary_emb(x, pos_u, t) for t in enc_lm.unique_layer_types}
            pe_n = {t: enc_lm.rotary_emb(x, pos_n, t) for t in enc_lm.unique_layer_types}
            types = self.text_config.layer_types
            h = x
            for i in range(split):
                h = enc_lm.layers[i](h, position_embeddings=pe_u[types[i]], attention_mask=masks_u[types[i]],
                                     position_ids=pos_u, cache=cache)
            for i in range(split):  # the cached K/V of the shared layers, one row per attribution row
                cache.layers[i].batch_select_indices(inv)
        h = h[inv]
        if grad and enc_hooks:
            h = h.detach().requires_grad_(True)
        handles = self._hook_encoder(enc_hooks, split, h, acts)
        try:
            for i in range(split, self.n_layers):
                h = enc_lm.layers[i](h, position_embeddings=pe_n[types[i]], attention_mask=masks_n[types[i]],
                                     position_ids=pos_n, cache=cache)
            if "final_norm" in enc_hooks:
                acts["final_norm"] = enc_lm.norm(h)
            if grad and dec_hooks:  # start the graph at the decoder input too (registered first: it replaces the output)
                handles.append(m.model.decoder.self_conditioning.register_forward_hook(
                    lambda mod, a, out: out.detach().requires_grad_(True)))
            for hook in dec_hooks:
                handles.append(self._register(m.model.decoder.layers, hook, acts))
            filled = torch.where(canvas == NOISE, self._noise[None, :L].expand_as(canvas), canvas)
            out = m(decoder_input_ids=filled, cache=cache,
                    decoder_attention_mask=self._decoder_masks(inp["attention_mask"][rows], cache, L),
                    decoder_position_ids=dec_pos)
        finally:
            for hd in handles:
                hd.remove()
        return AttributionOutput(logits=out.logits, activations=acts)

    def _hook_encoder(self, enc_hooks: list[str], split: int, h: torch.Tensor, acts: dict) -> list:
        """Hooked encoder states: the graph's starting tensor itself where the hook is the split
        point's input/output, else a forward hook (final_norm is read after the last layer)."""
        handles = []
        for hook in enc_hooks:
            if hook == "final_norm":
                continue
            if self._split_of(hook) == split and hook.rsplit(".", 1)[-1] in ("embed", "in", "out"):
                acts[hook] = h
            else:
                handles.append(self._register(self.model.model.encoder.language_model.layers, hook, acts))
        return handles

    def _encoder_embeddings(self, batch, uniq, rows, image_keep):
        """Token embeddings of the encoder input with the image soft tokens spliced in; with
        image_keep, a blanked image token keeps its position and type (mask) and loses its content."""
        inp = batch.inputs
        ids = inp["input_ids"][uniq]
        feats = inp["image_features"][uniq][_valid(inp["image_counts"][uniq], inp["image_features"].shape[1])]
        x = self.model.model.encoder.language_model.embed_tokens(ids)
        x = x.masked_scatter((ids == self.image_token_id)[..., None], feats.to(x.dtype))
        if image_keep is not None:
            x = torch.where(self._blank_positions(batch, rows, image_keep, ids.shape[1])[..., None], torch.zeros_like(x), x)
        return x

    def _register(self, layers, hook: str, acts: dict):
        parts = hook.split(".")
        if hook == "decoder.embed":  # (encoder.embed is always the graph's starting tensor itself)
            mod = self.model.model.decoder.self_conditioning
            return mod.register_forward_hook(lambda m_, a, out, k=hook: acts.__setitem__(k, out))
        if hook == "decoder.final_norm":
            return self.model.model.decoder.norm.register_forward_hook(
                lambda m_, a, out, k=hook: acts.__setitem__(k, out))
        i, part = int(parts[2]), parts[3]
        layer = layers[i]
        if part == "in":
            return layer.register_forward_pre_hook(lambda m_, args, k=hook: acts.__setitem__(k, args[0]))
        if part == "out":
            return layer.register_forward_hook(lambda m_, a, out, k=hook: acts.__setitem__(k, out))
        mod = getattr(layer, _PART_MODULE[part])
        return mod.register_forward_hook(
            lambda m_, a, out, k=hook: acts.__setitem__(k, out[0] if isinstance(out, tuple) else out))

    def _blank_positions(self, batch: PreparedBatch, rows: torch.Tensor, image_keep: torch.Tensor,
                         T: int) -> torch.Tensor:
        """(N, T) bool: sequence positions of the image cells that image_keep blanks."""
        out = torch.zeros((len(rows), T), dtype=torch.bool, device=self.device)
        for k, i in enumerate(rows.tolist()):
            pos = torch.as_tensor(batch.spans[i].positions().reshape(-1), device=self.device)
            if image_keep.shape[1] != len(pos):
                raise ValueError(f"image_keep has {image_keep.shape[1]} cells per row; sample {i} has a "
                                 f"{batch.spans[i].rows}x{batch.spans[i].cols} grid")
            out[k, pos] = ~image_keep[k].to(self.device).bool()
        return out

    def unembed(self, hidden):
        logits = self.model.lm_head(hidden).float()
        cap = self.model.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    # -- tokens -----------------------------------------------------------------------------
    def token_str(self, token_id):
        token_id = int(token_id)
        if token_id == NOISE:
            return "<noise>"
        return self.tok.decode([token_id], skip_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def is_content(self, token_id):
        """Not a special token, not whitespace or pure punctuation."""
        if int(token_id) in self._special:
            return False
        s = self.token_str(token_id).strip()
        return any(ch.isalnum() for ch in s) and not all(unicodedata.category(ch).startswith("P") for ch in s)

    def word_type(self, token_id):
        return None


def _valid(counts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: the first counts[b] slots of each row."""
    return torch.arange(width, device=counts.device)[None] < counts[:, None]


def _commit_steps(accepted: torch.Tensor, tokens: torch.Tensor, final: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, L) commit step: the first step s from which the position was accepted with its final token
    at every step in [s, last) (so it sat in every later decoder input with that token); `last` (the
    argmax read-out step) for positions that never settled. accepted / tokens: (S, B, L)."""
    S = accepted.shape[0]
    commit = last[:, None].expand_as(final).clone()
    for s in range(S - 1, -1, -1):
        ok = accepted[s] & (tokens[s] == final) & (s < last)[:, None] & (commit == s + 1)
        commit = torch.where(ok, torch.full_like(commit, s), commit)
    return commit


def _load_text_and_image_processing(local: str, model, how: str, trust: bool):
    """(tokenizer, image_processor, chat_template) from a checkpoint directory; None parts fall back
    to the backend's defaults. The tokenizer is required unless the vocabulary is tiny (test models:
    ByteTokenizer) or `how == "byte"`."""
    if how == "byte":
        return None, None, None
    has_tok = any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES)
    if not has_tok:
        vocab = model.config.get_text_config().vocab_size
        if vocab > 4096:
            from dcam.actors.models.loading import CheckpointError

            raise CheckpointError(f"checkpoint {local} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); the "
                                  "byte tokenizer fallback is only for tiny test models (model.tokenizer=byte forces it)")
        return None, None, None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=trust)
    template = getattr(tok, "chat_template", None)
    if not template and os.path.exists(os.path.join(local, "chat_template.jinja")):
        with open(os.path.join(local, "chat_template.jinja")) as f:
            template = f.read()
    if not template and os.path.exists(os.path.join(local, "chat_template.json")):
        with open(os.path.join(local, "chat_template.json")) as f:
            template = json.load(f).get("chat_template")
    image_processor = None
    if any(os.path.exists(os.path.join(local, f)) for f in ("processor_config.json", "preprocessor_config.json")):
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        try:
            image_processor = Gemma4ImageProcessorPil.from_pretrained(local, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - the defaults from the vision config are used instead
            log.warning("could not read the image processor config in %s (%s: %s); using the vision config's patch "
                        "and pooling sizes", local, type(e).__name__, e)
    return tok, image_processor, template


def _default_model_id(source: str) -> str:
    return str(source).rstrip("/").split("://", 1)[-1]
