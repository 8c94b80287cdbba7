"""The model organism: a tiny masked-diffusion vision-language model (LLaDA/LaViDa in miniature).

Sequence layout, one row per sample (T = P + G*G + L positions):

    [ prompt (P, left-padded with PAD) | image tokens (G*G, row-major) | response canvas (L) ]

- vision stem: convs with BatchNorm, three stride-2 steps -> a G x G grid of image tokens (G = S / 8);
- vision blocks (config.vision_layers; 2 in the shipped model): pre-LN transformer blocks over the
  image tokens alone, so each token knows the whole scene (e.g. its object's rank from the left)
  before the LM sees it; without them captions plateaued at 0.74-0.89 exact match;
- projector: 2-layer MLP into the LM width, plus fixed 2-D sin-cos positions on image tokens
  (without them the model does not even learn left-to-right order);
- LM: pre-LN bidirectional transformer blocks; logits only at canvas positions;
- masked diffusion: a canvas position holding MASK is predicted; generation starts fully masked
  and commits the most confident positions step by step (low-confidence remasking);
- prefix-DLM (config.prefix_lm, as LaViDa): prompt and image positions never attend to the
  canvas, so their hidden states are those of the conditioning pass whatever the response is.

It is a transformers PreTrainedModel: save_pretrained / from_pretrained work, and from_pretrained
also takes an fsspec URL (s3://...) through actors.models.loading. The word-level tokenizer is
saved next to the weights as tokenizer.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from dcam.actors import scenes
from dcam.actors.models.remasking import top_k_lowest_first

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[EOS]")
PROMPT_WORDS = ("describe", "the", "image", "what", "is", "in", "caption")


def default_vocab() -> list[str]:
    return [*SPECIAL_TOKENS, *PROMPT_WORDS, *scenes.FUNCTION_WORDS, *scenes.COLOURS, *scenes.SHAPES]


class UnknownWordError(ValueError):
    """A prompt or response word that the word-level tokenizer does not know."""


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary. Unknown words raise, never map to UNK:
    explaining a word the model cannot represent would be explaining something else."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.mask_id, self.eos_id = (self.index[t] for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace(",", " ").replace(".", " ").split()
        unknown = [w for w in words if w not in self.index or w in SPECIAL_TOKENS]
        if unknown:
            raise UnknownWordError(f"words not in the tiny model's vocabulary: {sorted(set(unknown))[:5]}")
        return [self.index[w] for w in words]

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i in (self.pad_id, self.eos_id):
                continue
            words.append(self.vocab[i])
        return " ".join(words)

    def token_str(self, i: int) -> str:
        return self.vocab[int(i)]

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            json.dump({"type": "dcam-word-tokenizer", "vocab": self.vocab}, f, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str) -> "WordTokenizer":
        with open(os.path.join(directory, "tokenizer.json")) as f:
            return cls(json.load(f)["vocab"])


class TinyDMLLMConfig(PretrainedConfig):
    model_type = "dcam_tiny_dmllm"

    def __init__(self, vocab=None, image_size=64, vision_dim=128, d_model=128, n_layers=4, n_heads=4,
                 mlp_ratio=4, max_prompt_len=6, response_len=12, prefix_lm=True, gen_steps=12, vision_layers=0,
                 **kwargs):
        self.vocab = list(vocab) if vocab is not None else default_vocab()
        self.image_size = image_size
        self.patch = 8  # the stem downsamples by 2**3
        self.vision_dim = vision_dim
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.max_prompt_len = max_prompt_len
        self.response_len = response_len
        self.prefix_lm = prefix_lm
        self.gen_steps = gen_steps
        self.vision_layers = vision_layers  # transformer blocks over the image tokens, before the projector
        super().__init__(**kwargs)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.grid ** 2 + self.response_len


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, allowed, past=None, keep_kv=None):
        """x (B,T,D); allowed (B,1,T,S) bool, True = may attend. past: (k, v) of S-T earlier
        positions (B,H,S-T,D/H) to attend to as well (the prefix cache); keep_kv: a list that
        receives this call's (k, v)."""
        B, T, D = x.shape
        q, k, v = self.heads(x)
        if keep_kv is not None:
            keep_kv.append((k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B,H,T,D/H)
        return self.proj(a.transpose(1, 2).reshape(B, T, D))

    def heads(self, x):
        """x (B,T,D) -> q, k, v, each (B,H,T,D/H)."""
        B, T, D = x.shape
        return self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)


class Block(nn.Module):
    """Pre-LN block. Hookable points: the block itself (input/output of the residual stream), ln1
    and ln2 (the normalised states attention and MLP consume), attn and mlp (their outputs)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x, allowed, past=None, keep_kv=None):
        x = x + self.attn(self.ln1(x), allowed, past, keep_kv)
        return x + self.mlp(self.ln2(x))


def vision_stem(vision_dim: int) -> nn.Sequential:
    """(B,3,S,S) -> (B,dv,S/8,S/8). Three stride-2 convs, then two token-level 3x3 convs for
    context (receptive field ~60 px). BatchNorm makes the from-scratch stem train in minutes; no
    full-resolution layer, which would cost most of a training step on 2 CPU cores."""
    layers, chans = [], [3, 32, 64, vision_dim]
    for i in range(3):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 2, 1), nn.BatchNorm2d(chans[i + 1]), nn.GELU()]
    layers += [nn.Conv2d(vision_dim, vision_dim, 3, 1, 1), nn.BatchNorm2d(vision_dim), nn.GELU(),
               nn.Conv2d(vision_dim, vision_dim, 3, 1, 1)]
    return nn.Sequential(*layers)


def sincos_2d(grid: int, d: int) -> torch.Tensor:
    """(grid*grid, d) fixed 2-D positions, row-major, quarter of the channels per sin/cos/x/y."""
    q = d // 4
    omega = 1.0 / (100.0 ** (torch.arange(q).float() / q))
    yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    ex, ey = xx.reshape(-1, 1) * omega, yy.reshape(-1, 1) * omega
    return 0.5 * torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], 1)


class TinyDMLLM(PreTrainedModel):
    config_class = TinyDMLLMConfig
    base_model_prefix = "tiny"
    main_input_name = "pixel_values"
    _supports_sdpa = True

    def __init__(self, config: TinyDMLLMConfig):
        super().__init__(config)
        c = config
        d, V = c.d_model, len(c.vocab)
        self.vision = vision_stem(c.vision_dim)
        # Optional ViT blocks over the stem's tokens (the prototype's recipe): every image token
        # sees the whole scene before the LM, e.g. its object's rank from the left.
        self.vision_pos = nn.Parameter(torch.randn(1, c.grid ** 2, c.vision_dim) * 0.02) if c.vision_layers else None
        self.vision_blocks = nn.ModuleList([Block(c.vision_dim, c.n_heads, c.mlp_ratio)
                                            for _ in range(c.vision_layers)])
        self.vision_ln = nn.LayerNorm(c.vision_dim) if c.vision_layers else nn.Identity()
        self.projector = nn.Sequential(nn.Linear(c.vision_dim, d), nn.GELU(), nn.Linear(d, d))
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Parameter(torch.randn(1, c.seq_len, d) * 0.02)
        self.type_emb = nn.Parameter(torch.randn(3, d) * 0.02)  # prompt, image, canvas
        self.blocks = nn.ModuleList([Block(d, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)
        self.register_buffer("pos_2d", sincos_2d(c.grid, d), persistent=False)
        self.post_init()

    def _init_weights(self, module):  # keep PyTorch's default init (what the recipe was measured with)
        if isinstance(module, TinyDMLLM):
            module.pos_2d.copy_(sincos_2d(self.config.grid, self.config.d_model))

    # -- layout -------------------------------------------------------------------------------
    @property
    def image_start(self) -> int:
        return self.config.max_prompt_len

    @property
    def canvas_start(self) -> int:
        return self.config.max_prompt_len + self.config.grid ** 2

    def segment_ids(self, device=None) -> torch.Tensor:
        """(T,) 0 = prompt, 1 = image, 2 = canvas."""
        c = self.config
        return torch.tensor([0] * c.max_prompt_len + [1] * c.grid ** 2 + [2] * c.response_len, device=device)

    def attention_allowed(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """(B,1,T,T) bool. PAD keys are never attended; under prefix_lm, prompt and image queries do
        not see canvas keys (LaViDa's prefix-DLM mask)."""
        B, P = prompt_ids.shape
        T = self.config.seq_len
        seg = self.segment_ids(prompt_ids.device)
        key_ok = torch.ones(B, T, dtype=torch.bool, device=prompt_ids.device)
        key_ok[:, :P] = prompt_ids != self.config.vocab.index("[PAD]")
        allowed = key_ok[:, None, :].expand(B, T, T).clone()
        if self.config.prefix_lm:
            allowed &= ~((seg[:, None] < 2) & (seg[None, :] == 2))[None]
        return allowed[:, None]

    # -- forward ------------------------------------------------------------------------------
    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised pixels -> (B,G*G,dv) vision-encoder tokens, row-major."""
        v = self.vision(pixel_values).flatten(2).transpose(1, 2)
        if self.vision_blocks:
            v = v + self.vision_pos
            everything = torch.ones(1, 1, v.shape[1], v.shape[1], dtype=torch.bool, device=v.device)
            for block in self.vision_blocks:
                v = block(v, everything)
        return self.vision_ln(v)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised pixels -> (B,G*G,d) projected image tokens (positions included)."""
        return self.projector(self.vision_tokens(pixel_values)) + self.type_emb[1] + self.pos_2d

    def embed(self, pixel_values, prompt_ids, canvas_ids, image_embeds=None) -> torch.Tensor:
        """(B,T,d) input of the first block."""
        img = self.image_features(pixel_values) if image_embeds is None else image_embeds
        p = self.tok_emb(prompt_ids) + self.type_emb[0]
        r = self.tok_emb(canvas_ids) + self.type_emb[2]
        return torch.cat([p, img, r], 1) + self.pos_emb

    def forward(self, pixel_values=None, prompt_ids=None, canvas_ids=None, inputs_embeds=None, **kwargs):
        """Returns canvas logits (B,L,V). pixel_values (B,3,S,S); prompt_ids (B,P); canvas_ids (B,L)
        with MASK at positions still to be denoised. inputs_embeds replaces embed() when given."""
        x = self.embed(pixel_values, prompt_ids, canvas_ids) if inputs_embeds is None else inputs_embeds
        allowed = self.attention_allowed(prompt_ids)
        for block in self.blocks:
            x = block(x, allowed)
        # ln_f over the whole sequence (per-position, so canvas logits are unchanged) keeps the
        # final-norm image states hookable for logit-lens baselines (TAM).
        return self.head(self.ln_f(x)[:, self.canvas_start:])

    # -- prefix cache (prefix-DLM only) -------------------------------------------------------
    def prefix_cache(self, prompt_ids: torch.Tensor, image_embeds: torch.Tensor) -> list:
        """Per LM block, (k, v) (B,H,P+G*G,d/H) of the prompt and image positions. Under prefix-DLM
        they never attend to the canvas, so one pass serves every denoising step (LaViDa's
        prefix KV cache): a step then runs only the L canvas positions. Exact up to float
        rounding (the same sums in different matmul shapes)."""
        if not self.config.prefix_lm:
            raise ValueError("a prefix cache is exact only under prefix_lm")
        n_prefix = self.canvas_start
        p = self.tok_emb(prompt_ids) + self.type_emb[0]
        x = torch.cat([p, image_embeds], 1) + self.pos_emb[:, :n_prefix]
        allowed = self.attention_allowed(prompt_ids)[:, :, :n_prefix, :n_prefix]
        cache: list = []
        for block in self.blocks[:-1]:
            x = block(x, allowed, keep_kv=cache)
        last = self.blocks[-1]  # its output is never used, only its keys and values
        cache.append(tuple(last.attn.heads(last.ln1(x))[1:]))  # (q, k, v) -> (k, v)
        return cache

    def canvas_logits(self, prompt_ids: torch.Tensor, canvas_ids: torch.Tensor, cache: list) -> torch.Tensor:
        """(B,L,V) canvas logits from a prefix_cache: equal to forward() under prefix-DLM."""
        n_prefix = self.canvas_start
        x = self.tok_emb(canvas_ids) + self.type_emb[2] + self.pos_emb[:, n_prefix:]
        allowed = self.attention_allowed(prompt_ids)[:, :, n_prefix:]  # canvas queries, all keys
        for block, past in zip(self.blocks, cache):
            x = block(x, allowed, past=past)
        return self.head(self.ln_f(x))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also accepts any fsspec URL (s3://bucket/prefix/): copied once to a local cache first."""
        from dcam.actors.models.loading import resolve_checkpoint

        return super().from_pretrained(resolve_checkpoint(str(pretrained_model_name_or_path)), *args, **kwargs)


# ---------------------------------------------------------------------------------- diffusion
def normalise_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B,S,S,3) uint8 -> (B,3,S,S) float, zero-centred."""
    return (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25


def diffusion_loss(model: TinyDMLLM, pixels, prompt_ids, targets, generator: torch.Generator, eps: float = 1e-3):
    """LLaDA's masked-diffusion loss: t ~ U(eps, 1) (stratified over the batch), each canvas token
    masked with probability t, cross-entropy on masked positions weighted by 1/t."""
    B, L = targets.shape
    strata = (torch.arange(B).float() + torch.rand(1, generator=generator)) / B
    t = (eps + (1 - eps) * strata[torch.randperm(B, generator=generator)]).view(B, 1)
    masked = torch.rand(B, L, generator=generator) < t
    canvas = torch.where(masked, torch.full_like(targets, model.config.vocab.index("[MASK]")), targets)
    logits = model(pixels, prompt_ids, canvas)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(B, L)
    return (ce * masked / t).sum() / (B * L)


@dataclass
class Trajectory:
    """Result of denoising a batch: final canvas ids (B,L) and, per position, the step (0-based)
    at which it was committed. The canvas state *before* step s is ids where commit_step < s, MASK
    elsewhere, so every intermediate state can be rebuilt without storing it."""
    ids: torch.Tensor
    commit_step: torch.Tensor
    n_steps: int

    def state_before(self, step: torch.Tensor, mask_id: int) -> torch.Tensor:
        """(B,L) canvas just before `step` (B,) was executed."""
        keep = self.commit_step < step[:, None]
        return torch.where(keep, self.ids, torch.full_like(self.ids, mask_id))


def step_counts(length: int, steps: int) -> list[int]:
    """How many positions each step commits (LLaDA's uniform schedule: the remainder goes first)."""
    steps = max(1, min(steps, length))
    return [length // steps + (1 if k < length % steps else 0) for k in range(steps)]


@torch.no_grad()
def denoise(model: TinyDMLLM, pixels, prompt_ids, steps: int | None = None, block_length: int | None = None,
            temperature: float = 0.0, generator: torch.Generator | None = None,
            forced_ids: torch.Tensor | None = None, use_prefix_cache: bool = True) -> Trajectory:
    """Low-confidence remasking (LLaDA's generate): start from an all-MASK canvas; at each step
    predict every masked position and commit the most confident ones (exact ties: the lowest
    position first, models.remasking). Semi-autoregressive blocks
    of `block_length` are denoised left to right. temperature 0 is greedy; otherwise Gumbel-max
    sampling with the given torch.Generator (required, so runs are reproducible).

    forced_ids (B,L): replay the schedule for a given response instead of sampling: the candidate
    at each masked position is the given token and its confidence is the model's probability of
    it. This yields the order in which the model would have committed that response.

    use_prefix_cache: under prefix-DLM, run the prompt and image once and each step only on the
    canvas (see TinyDMLLM.prefix_cache); False runs the full sequence every step."""
    c = model.config
    B, L = pixels.shape[0], c.response_len
    steps = steps or c.gen_steps
    block_length = block_length or L
    if L % block_length:
        raise ValueError(f"block_length {block_length} must divide the response length {L}")
    n_blocks = L // block_length
    if steps % n_blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {n_blocks}")
    if temperature > 0 and generator is None:
        raise ValueError("temperature > 0 needs a seeded torch.Generator")
    mask_id, pad_id = c.vocab.index("[MASK]"), c.vocab.index("[PAD]")
    x = torch.full((B, L), mask_id, dtype=torch.long, device=pixels.device)
    commit = torch.full((B, L), -1, dtype=torch.long, device=pixels.device)
    image_embeds = model.image_features(pixels)  # the image never changes across steps
    cache = model.prefix_cache(prompt_ids, image_embeds) if c.prefix_lm and use_prefix_cache else None
    step = 0
    for blk in range(n_blocks):
        lo, hi = blk * block_length, (blk + 1) * block_length
        for n_commit in step_counts(block_length, steps // n_blocks):
            logits = (model.canvas_logits(prompt_ids, x, cache) if cache is not None else
                      model(pixels, prompt_ids, x, inputs_embeds=model.embed(pixels, prompt_ids, x, image_embeds)))
            logits[..., mask_id] = -torch.inf
            logits[..., pad_id] = -torch.inf
            probs = logits.float().softmax(-1)
            if forced_ids is not None:
                pred = forced_ids
            elif temperature > 0:
                u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float64)
                pred = (logits.double() / temperature - torch.log(-torch.log(u))).argmax(-1)
            else:
                pred = probs.argmax(-1)
            conf = probs.gather(-1, pred[..., None])[..., 0]
            open_ = (x == mask_id)
            open_[:, :lo] = False
            open_[:, hi:] = False
            conf = torch.where(open_, conf, torch.full_like(conf, float("-inf")))
            take = top_k_lowest_first(conf, n_commit)  # ties (common at float32 1.0): lowest position
            x = torch.where(take, pred, x)
            commit = torch.where(take, torch.full_like(commit, step), commit)
            step += 1
    return Trajectory(ids=x, commit_step=commit, n_steps=step)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encode_prompts(tok: WordTokenizer, prompts: list[str], max_len: int) -> torch.Tensor:
    """(B, max_len) left-padded prompt ids."""
    out = torch.full((len(prompts), max_len), tok.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        if len(ids) > max_len:
            raise ValueError(f"prompt has {len(ids)} words; the tiny model takes at most {max_len}")
        if ids:
            out[i, max_len - len(ids):] = torch.tensor(ids)
    return out


def encode_responses(tok: WordTokenizer, responses: list[str], length: int) -> torch.Tensor:
    """(B, length) response ids, EOS-padded."""
    out = torch.full((len(responses), length), tok.eos_id, dtype=torch.long)
    for i, r in enumerate(responses):
        ids = tok.encode(r)
        if len(ids) >= length:
            raise ValueError(f"response has {len(ids)} words; the tiny model's canvas holds {length - 1}")
        out[i, :len(ids)] = torch.tensor(ids)
    return out
