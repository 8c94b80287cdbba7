"""LaViDa-LLaDA (`model=lavida`): jacklishufan/LaViDa's LlavaLladaForMaskedDiffusion, built natively.

Model: SigLIP-so400m-patch14-384 tower (last layer removed, pre-post-layernorm features) ->
mlp2x_gelu projector -> each view's 27 x 27 grid bilinearly pooled to 14 x 14 -> anyres image block
[base 14 x 14][unpadded grid, image_newline after every row] spliced into the "llada" chat prompt
-> LLaDA-8B. Checkpoints are loaded from their public safetensors by key mapping (OLMo-layout LM
keys, LLaVA tower keys; see `REFERENCE_RULES`); the checkpoint's `auto_map` code is never run.

Generation = LaViDa's `generate(..., prefix_lm=True)` (llava/model/language_model/llada/generate.py),
re-implemented call for call and checked against it (tests/actors/models/fixtures/lavida_generate.json):
* one prefix pass over [prompt + image] under the prefix-DLM mask builds a KV cache; every denoising
  step then runs only the canvas (L = response_len mask tokens) against that cache;
* steps: max_new_tokens // n_blocks per block, times step_ratio; tokens committed per step from the
  schedule (uniform, or "shift": sigma(t) = s t / (1 + (s - 1) t) on steps + 1 points, floored
  differences of sigma * block_length, clamped >= 1, excess trimmed round-robin, reversed);
* proposal: argmax of the logits (temperature 0) or Gumbel-max in float64, exp(z) / (-log u)^T with u
  drawn per sample from a torch.Generator seeded with `seed` (one (L, V) draw per pass, the
  reference's torch.rand_like order: one sample run after torch.manual_seed(seed) matches it);
* low-confidence remasking: the k masked positions of the current block with the highest
  probability of their proposal, ties to the lowest position.
A position's commit step is the index of the pass that unmasked it, so `Generation.state_before(s)`
is exactly the canvas pass s read (tested).

Attribution: the one [prefix | canvas] pass under the prefix-DLM mask is the cached generation
step (prefix queries never see the canvas, so the prefix states equal the cache-building pass and
the canvas logits equal the cached step's; tested). The reference's Diffusion-CAM instead re-encodes
bidirectionally (spec §2.1 [D]); dcam does not reproduce that.

Left padding is masked (the reference ignores padding: batch 1 only); positions skip padding, so a
batch equals its samples run alone.
"""
from __future__ import annotations

import torch

from dcam.actors.models.llada_backend import LladaFamilyBackend
from dcam.actors.models.llada_lm import OLMO_RULES, LladaLMConfig, PrefixKV, positions, prefix_dlm_mask
from dcam.actors.models.llada_mm import ImageLayout
from dcam.actors.models.protocol import Generation
from dcam.actors.models.remasking import top_k_lowest_first
from dcam.actors.models.siglip_tower import VISION_RULES

MODEL_TYPES = ("llava_llada",)  # LaViDa's config.json model_type (its auto_map code is never executed)
# reference key -> native key (this module's LladaMultimodal): LM in the OLMo layout under "lm."
REFERENCE_RULES = (tuple((p, "lm." + r) for p, r in OLMO_RULES) + VISION_RULES
                   + ((r"^model\.mm_projector\.(0|2)\.(weight|bias)$", r"mm_projector.\1.\2"),
                      (r"^model\.image_newline$", "image_newline")))
SCHEDULES = (None, "shift", "linear")


def layout_from_config(c: dict, tile: int, patch: int) -> ImageLayout:
    """LaViDa's image settings from its config.json (training-script values as defaults)."""
    checks = {"mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
              "image_aspect_ratio": "anyres", "mm_spatial_pool_mode": "bilinear"}
    for key, want in checks.items():
        if c.get(key, want) != want:
            raise ValueError(f"LaViDa config {key}={c.get(key)!r} is not supported (the released model: {want!r})")
    pins = c.get("image_grid_pinpoints") or ImageLayout().pinpoints
    from dcam.actors.models.anyres import expand_pinpoints

    return ImageLayout(tile=tile, patch=patch, pinpoints=tuple(expand_pinpoints(pins, tile)), pool=True)


def transfer_counts(n: int, steps: int, schedule: str | None = None, shift: float = 3.0) -> list[int]:
    """Tokens committed per step for a block of n masked positions (get_num_transfer_tokens[_sch])."""
    if schedule is None:
        base, rem = divmod(n, steps)
        return [base + 1] * rem + [base] * (steps - rem)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    steps = int(min(steps, n))
    t = torch.linspace(0, 1, steps + 1)  # float32, as the reference
    sigma = shift * t / (1 + (shift - 1) * t) if schedule == "shift" else t
    cum = (sigma * torch.tensor([n])).to(torch.int64)
    d = (cum[1:] - cum[:-1]).clamp(min=1).tolist()
    excess, j = sum(d) - n, 0
    while excess > 0:  # trim round-robin from the first step, never below one token
        j %= len(d)
        if d[j] > 1:
            d[j] -= 1
            excess -= 1
        j += 1
    return d[::-1]


class LavidaBackend(LladaFamilyBackend):
    """dcam backend for LaViDa-LLaDA; hooks and inputs: see llada_backend."""

    def __init__(self, model, tokenizer, model_id: str = "lavida", device: str = "cpu", response_len: int = 64,
                 block_length: int | None = None, step_ratio: float | None = 0.5, schedule: str | None = "shift",
                 shift: float = 3.0, temperature: float = 0.1, image_view: str = "grid"):
        super().__init__(model, tokenizer, model_id, device, response_len, image_view)
        self.block_length = int(block_length or response_len)
        if self.response_len % self.block_length:
            raise ValueError(f"response_len {self.response_len} is not a multiple of block_length {self.block_length}")
        self.step_ratio, self.schedule, self.shift = step_ratio, schedule, float(shift)
        self.temperature = float(temperature)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.last_trace: list[torch.Tensor] | None = None  # canvas read by each pass of the latest denoising

    def _attention_mask(self, valid, canvas_len):
        return prefix_dlm_mask(valid, canvas_len)

    @property
    def steps_per_block(self) -> int:
        n_blocks = self.response_len // self.block_length
        steps = self.response_len // n_blocks
        return int(steps * self.step_ratio) if self.step_ratio else steps

    def generate(self, batch, seed=0):
        return self._denoise(batch, seed=seed, forced=None)

    def forced_trajectory(self, batch):
        return self._denoise(batch, seed=0, forced=self._forced_canvas(batch))

    def prefix_context(self, batch) -> tuple[PrefixKV, torch.Tensor, tuple]:
        """LaViDa's prefix pass: (KV cache of [prompt + image] under the prefix-DLM mask, the canvas
        queries' mask, the canvas RoPE) -- everything a canvas-only denoising pass needs."""
        lm, inp = self.model.lm, batch.inputs
        prefix, valid = inp["prefix_embeds"], inp["prefix_valid"]
        T, L = valid.shape[1], self.response_len
        pos = positions(valid, L)
        cache = PrefixKV()
        lm.run_layers(prefix, prefix_dlm_mask(valid, L, "prefix"), lm.rope(prefix, pos[:, :T]), cache=cache)
        cache.recording = False
        return cache, prefix_dlm_mask(valid, L, "canvas"), lm.rope(prefix[:, :1].expand(-1, L, -1), pos[:, T:])

    def cached_canvas_logits(self, context, canvas: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits of one canvas-only pass against the prefix cache."""
        cache, mask, rope = context
        lm = self.model.lm
        return lm.logits(lm.run_layers(lm.embed(canvas), mask, rope, cache=cache))

    @torch.no_grad()
    def _denoise(self, batch, seed: int, forced: torch.Tensor | None) -> Generation:
        B, L, bl = batch.size, self.response_len, self.block_length
        context = self.prefix_context(batch)  # 1. the prefix pass, once
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=self.device)
        commit = torch.full_like(x, -1)
        gens = ([torch.Generator(device=self.device).manual_seed(int(seed)) for _ in range(B)]
                if self.temperature > 0 and forced is None else None)
        counts = transfer_counts(bl, self.steps_per_block, self.schedule, self.shift)
        trace, s = [], 0
        for blk in range(L // bl):
            for k in counts:  # 2. canvas-only passes
                masked = x == self.mask_id
                if not masked[:, blk * bl:(blk + 1) * bl].any():
                    continue
                trace.append(x.clone())
                pred, conf = self._propose(self.cached_canvas_logits(context, x), masked, forced, gens, (blk + 1) * bl)
                take = top_k_lowest_first(conf, k)
                x = torch.where(take, pred, x)
                commit = torch.where(take, torch.full_like(commit, s), commit)
                s += 1
        self.last_trace = trace
        return Generation(ids=x, commit_step=commit, n_steps=s, source="generated" if forced is None else "given")

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LavidaBackend:
        from dcam.actors.models.llada_checkpoint import load_multimodal

        model, tok, _, source = load_multimodal(model_cfg, MODEL_TYPES, _build_from_config, REFERENCE_RULES,
                                                    device, dtype, backend="lavida")
        opts = {k: model_cfg[k] for k in ("response_len", "block_length", "step_ratio", "shift", "temperature",
                                          "image_view") if model_cfg.get(k) is not None}
        if "schedule" in model_cfg:
            opts["schedule"] = model_cfg["schedule"] or None
        return cls(model, tok, model_id=model_cfg.get("model_id") or str(source).rstrip("/").split("://", 1)[-1],
                   device=device, **opts)


def _build_from_config(config: dict, tower_config, dtype):
    from dcam.actors.models.llada_mm import LladaMultimodal

    if "d_model" not in config:
        raise ValueError("not a LaViDa-LLaDA config (no OLMo-style d_model; LLaDA-V checkpoints: model=llada_v)")
    layout = layout_from_config(config, tower_config.image_size, tower_config.patch_size)
    return LladaMultimodal(LladaLMConfig.from_olmo(config), tower_config, layout, dtype)
