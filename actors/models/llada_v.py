"""LLaDA-V (`model=llada_v`): ML-GSAI/LLaDA-V's LlavaLLaDAModelLM, built natively.

Model: SigLIP(2)-so400m-patch14-384 tower loaded through the SigLIP v1 class (last layer removed,
features before post_layernorm = select layer -2) -> mlp2x_gelu projector -> anyres_max_4 image
block: the base view's 27 x 27 = 729 cells, then the unpadded tile grid (pinpoints 1x1..6x6 tiles
of 384 px, no pooling), bilinearly shrunk when it exceeds 1.1x the 4-tile budget, with an
image_newline after every row (up to ~3.7k image tokens) -> LLaDA-8B in the HF-Llama key layout
(LLaDA-V's rename_checkpoint.py), bidirectional. Loaded by key mapping (`REFERENCE_RULES`); the
checkpoint's `auto_map` code is never run.

Generation = `LLaDAModelLM.generate_with_embeds` (train/llava/model/language_model/modeling_llada.py),
re-implemented call for call and checked against it (fixtures/llada_v_generate.json):
* the whole [prefix | canvas] sequence is re-encoded at every step (so every step's hidden states
  hold the image: every step is structurally valid);
* semi-autoregressive blocks of block_length, steps // n_blocks passes each, tokens per pass
  uniform (the remainder on the first passes); low-confidence remasking within the block;
* at masked positions the logits of <|endoftext|>, <|startoftext|>, <|start_header_id|> and
  <|end_header_id|> are -inf;
* stop rule: once a <|eot_id|> is in the canvas, the earliest one is the stop position; only masked
  positions before it are filled from then on, and the sample ends when none is left. Positions
  after the stop that were never filled stay masked (`commit_step` -1): they were masked in every
  pass the model ran, and the reference discards them (it returns the canvas up to the stop).
  (On the sample's last pass the reference's top-k may also fill some positions after the stop
  when fewer masked positions than the step's count are left; no pass ever reads them, dcam leaves
  them masked.)
* temperature 0 (the authors' demo) is exact. With temperature > 0 dcam draws the Gumbel noise
  per sample from a generator seeded with `seed`, over the canvas only: seeded and batch-invariant,
  but not the reference's random stream (which draws noise for every prompt position too).
Ties in confidence go to the lowest position (the reference's torch.topk leaves them unspecified).
"""
from __future__ import annotations

import torch

from dcam.actors.models.anyres import expand_pinpoints, max_tiles_of
from dcam.actors.models.llada_backend import LladaFamilyBackend
from dcam.actors.models.llada_lm import LLAMA_RULES, LladaLMConfig, padding_mask, positions
from dcam.actors.models.llada_mm import ImageLayout
from dcam.actors.models.protocol import Generation
from dcam.actors.models.remasking import propose, top_k_lowest_first
from dcam.actors.models.siglip_tower import VISION_RULES

MODEL_TYPES = ("llava_llada",)  # LLaDA-V's config.json model_type (its auto_map code is never executed)
REFERENCE_RULES = (tuple((p, "lm." + r) for p, r in LLAMA_RULES) + VISION_RULES
                   + ((r"^model\.mm_projector\.(0|2)\.(weight|bias)$", r"mm_projector.\1.\2"),
                      (r"^model\.image_newline$", "image_newline")))
DEFAULT_PINPOINTS = "(1x1),...,(6x6)"


def layout_from_config(c: dict, tile: int, patch: int) -> ImageLayout:
    """LLaDA-V's image settings from its config.json (its training-script values as defaults)."""
    for key, want in {"mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad"}.items():
        if c.get(key, want) != want:
            raise ValueError(f"LLaDA-V config {key}={c.get(key)!r} is not supported (the released model: {want!r})")
    max_tiles = max_tiles_of(c.get("image_aspect_ratio", "anyres_max_4"))
    pins = expand_pinpoints(c.get("image_grid_pinpoints") or DEFAULT_PINPOINTS, tile)
    return ImageLayout(tile=tile, patch=patch, pinpoints=tuple(pins), pool=False, max_tiles=max_tiles)


def uniform_counts(n: int, steps: int) -> list[int]:
    base, rem = divmod(n, steps)
    return [base + 1] * rem + [base] * (steps - rem)


class LladaVBackend(LladaFamilyBackend):
    """dcam backend for LLaDA-V; hooks and inputs: see llada_backend."""

    def __init__(self, model, tokenizer, model_id: str = "llada-v", device: str = "cpu", response_len: int = 128,
                 gen_steps: int | None = None, block_length: int | None = None, temperature: float = 0.0,
                 image_view: str = "grid"):
        super().__init__(model, tokenizer, model_id, device, response_len, image_view)
        self.block_length = int(block_length or response_len)
        self.gen_steps = int(gen_steps or response_len)
        n_blocks = self.response_len // self.block_length
        if self.response_len % self.block_length or self.gen_steps % n_blocks:
            raise ValueError(f"response_len {self.response_len} must be a multiple of block_length "
                             f"{self.block_length}, and gen_steps {self.gen_steps} of the number of blocks {n_blocks}")
        self.temperature = float(temperature)
        self.suppressed = [self.ids[k] for k in ("eos", "bos", "start_header", "end_header")]
        self.last_trace: list[torch.Tensor] | None = None

    def _attention_mask(self, valid, canvas_len):
        full = torch.cat([valid.bool(), torch.ones(valid.shape[0], canvas_len, dtype=torch.bool, device=valid.device)], 1)
        return padding_mask(full)

    def generate(self, batch, seed=0):
        return self._denoise(batch, seed=seed, forced=None)

    def forced_trajectory(self, batch):
        return self._denoise(batch, seed=0, forced=self._forced_canvas(batch))

    @torch.no_grad()
    def _denoise(self, batch, seed: int, forced: torch.Tensor | None) -> Generation:
        inp = batch.inputs
        B, L, bl = batch.size, self.response_len, self.block_length
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=self.device)
        commit, last = torch.full_like(x, -1), torch.full((B,), -1, dtype=torch.long, device=self.device)
        stop = torch.full((B,), L, dtype=torch.long, device=self.device)  # earliest <|eot_id|>; L = none yet
        gens = ([torch.Generator(device=self.device).manual_seed(int(seed)) for _ in range(B)]
                if self.temperature > 0 and forced is None else None)
        where = torch.arange(L, device=self.device)[None]
        trace, s = [], 0
        for blk in range(L // bl):
            lo, hi = blk * bl, (blk + 1) * bl
            for k in uniform_counts(bl, self.gen_steps // (L // bl)):
                masked = x == self.mask_id
                found = stop < L
                finished = found & ~(masked & (where < stop[:, None])).any(1)
                alive = ~finished & masked[:, lo:hi].any(1) & ~(found & (stop <= lo))
                if not alive.any():
                    break
                r = alive.nonzero()[:, 0]
                trace.append((r.clone(), x[r].clone()))
                logits = self._canvas_logits(inp, r, x[r])
                pred, conf = self._propose(logits, masked[r], None if forced is None else forced[r],
                                           None if gens is None else [gens[i] for i in r.tolist()],
                                           torch.where(found[r], stop[r], torch.full_like(stop[r], hi)))
                take = top_k_lowest_first(conf, k)
                x[r] = torch.where(take, pred, x[r])
                commit[r] = torch.where(take, torch.full_like(take, s, dtype=torch.long), commit[r])
                last[r] = s
                eot = x[r] == self.ids["eot"]
                stop[r] = torch.minimum(stop[r], torch.where(eot.any(1), eot.float().argmax(1), torch.full_like(stop[r], L)))
                s += 1
        self.last_trace = trace
        return Generation(ids=x, commit_step=commit, n_steps=s, source="generated" if forced is None else "given",
                          final_step=last)

    def _canvas_logits(self, inp: dict, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
        """(R, L, V) float32 canvas logits of a full re-encode of [prefix | canvas] for the given rows."""
        lm = self.model.lm
        valid, L = inp["prefix_valid"][rows], canvas.shape[1]
        x = torch.cat([inp["prefix_embeds"][rows], lm.embed(canvas)], dim=1)
        h = lm.run_layers(x, self._attention_mask(valid, L), lm.rope(x, positions(valid, L)))
        return lm.logits(h[:, -L:]).float()

    def _propose(self, logits, masked, forced, gens, limit: torch.Tensor):
        """(proposal ids, confidence): suppressed special ids at masked positions; -inf confidence where
        not masked or at/after `limit` (the block end, or the stop position once found)."""
        for tid in self.suppressed:
            logits[..., tid] = torch.where(masked, torch.full_like(logits[..., tid], float("-inf")), logits[..., tid])
        pred, conf = propose(logits, masked, forced, gens, self.temperature, self.device)
        beyond = torch.arange(conf.shape[1], device=conf.device)[None] >= limit[:, None]
        return pred, conf.masked_fill(beyond, float("-inf"))

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LladaVBackend:
        from dcam.actors.models.llada_checkpoint import load_multimodal

        model, tok, _, source = load_multimodal(model_cfg, MODEL_TYPES, _build_from_config, REFERENCE_RULES,
                                                    device, dtype, backend="llada_v")
        opts = {k: model_cfg[k] for k in ("response_len", "gen_steps", "block_length", "temperature", "image_view")
                if model_cfg.get(k) is not None}
        return cls(model, tok, model_id=model_cfg.get("model_id") or str(source).rstrip("/").split("://", 1)[-1],
                   device=device, **opts)


def _build_from_config(config: dict, tower_config, dtype):
    from dcam.actors.models.llada_mm import LladaMultimodal

    if "num_hidden_layers" not in config:
        raise ValueError("not a LLaDA-V config (no HF-Llama-style num_hidden_layers; LaViDa checkpoints: model=lavida)")
    layout = layout_from_config(config, tower_config.image_size, tower_config.patch_size)
    return LladaMultimodal(LladaLMConfig.from_llama(config), tower_config, layout, dtype)
