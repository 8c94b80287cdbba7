"""MMaDA (`model=mmada`): Gen-Verse/MMaDA's MMadaModelLM for understanding, built natively.

Model: the image becomes discrete tokens -- MAGVIT-v2 codes (`magvit2.py`: 512 px -> 32 x 32
codes, raster order), token id = len(text tokenizer) + code (126349 + code for MMaDA-8B) -- and
the LLaDA-8B backbone (`llada_lm.LladaLM`, OLMo-layout keys as LaViDa's, vocabulary 134656 =
LLaDA's 126464 + 8192 codes) reads the sequence of inference_mmu.py:

    <|mmu|> <|soi|> [h*w code tokens] <|eoi|> chat_template([user: question], generation prompt)

(<|mmu|> 126089, <|soi|> 126084, <|eoi|> 126085: MMaDA's reserved-token mapping; the chat template
is the checkpoint tokenizer's, no system turn). Attention is bidirectional; left padding is
masked (the reference's bool attention_bias, used only when a batch has padding); positions skip
padding, so a batch equals its samples alone.

The checkpoint is two directories: `source` (config.json model_type "mmada" with an `auto_map`
that is never imported, *.safetensors, tokenizer) and `vq_source` (showlab/magvitv2).

Generation = `MMadaModelLM.mmu_generate` (models/modeling_mmada.py), checked against it
(fixtures/mmada_generate.json): the whole [prompt | canvas] is re-encoded at every pass;
semi-autoregressive blocks of block_length with steps // n_blocks passes each; tokens per pass
uniform (remainder on the first passes); proposal = argmax (temperature 0, the reference's
default) or Gumbel-max in float64; low-confidence remasking inside the current block; no stop
rule and no suppressed ids (the reference fills the whole canvas). Ties in confidence go to the
lowest position (`remasking.top_k_lowest_first`; the reference's torch.topk leaves them unspecified). With
temperature > 0 the noise is drawn per sample from a generator seeded with `seed`, canvas only:
seeded and batch-invariant, not the reference's random stream.

Attribution: hooks as every LLaDA-family backend (llada_backend); the map lives on the h x w code
span, so the gradient starts at the embeddings of the image-code tokens (hook `embed`) or at the
hidden states of those positions (layers.<i>.*). The tokenizer's codes are discrete and carry no
gradient: the probe never differentiates through MAGVIT-v2.

Faithfulness blanking: a blanked cell's code token is replaced by the embedding of <|mdm_mask|>
(126336) -- the token MMaDA's own training puts where image tokens are unknown (its text-to-image
objective masks codes with it), so "this cell's content is unknown" is in the model's vocabulary,
unlike a grey image, whose codes are ordinary content.
"""
from __future__ import annotations

import numpy as np
import torch

from dcam.actors.models import magvit2
from dcam.actors.models.llada_backend import LladaFamilyBackend
from dcam.actors.models.llada_lm import OLMO_RULES, LladaLM, LladaLMConfig, padding_mask, positions
from dcam.actors.models.llada_mm import to_pil
from dcam.actors.models.protocol import Generation, ImageSpan, PreparedBatch, SampleError
from dcam.actors.models.remasking import top_k_lowest_first

MODEL_TYPES = ("mmada",)  # MMaDA's config.json model_type (its auto_map code is never executed)
REFERENCE_RULES = OLMO_RULES  # checkpoint key -> LladaLM key
TASK_TOKEN_IDS = {"mmu": 126089, "soi": 126084, "eoi": 126085}  # training/prompting_utils.reserved_token_mapping
CODEBOOK_SIZE = 8192


class MmadaModel(torch.nn.Module):
    """lm (LladaLM, the checkpoint's dtype) + vq (MAGVIT-v2 encoder, always float32)."""

    def __init__(self, lm: LladaLM, vq: magvit2.Magvit2Encoder):
        super().__init__()
        self.lm, self.vq = lm, vq.float()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.lm_head.weight.dtype


def uniform_counts(n: int, steps: int) -> list[int]:
    """get_num_transfer_tokens: n tokens over `steps` passes, the remainder on the first passes."""
    base, rem = divmod(n, steps)
    return [base + 1] * rem + [base] * (steps - rem)


class MmadaBackend(LladaFamilyBackend):
    """dcam backend for MMaDA; hooks and the attribution forward: see llada_backend."""

    def __init__(self, model: MmadaModel, tokenizer, model_id: str = "mmada", device: str = "cpu",
                 response_len: int = 512, gen_steps: int | None = 256, block_length: int | None = 128,  # None: one block
                 temperature: float = 0.0, resolution: int = 512, task_ids: dict | None = None):
        super().__init__(model, tokenizer, model_id, device, response_len)
        self.block_length = int(block_length or response_len)
        self.gen_steps = int(gen_steps or response_len)
        n_blocks = self.response_len // self.block_length
        if self.response_len % self.block_length or self.gen_steps % n_blocks:
            raise ValueError(f"response_len {self.response_len} must be a multiple of block_length "
                             f"{self.block_length}, and gen_steps {self.gen_steps} of the number of blocks {n_blocks}")
        self.temperature = float(temperature)
        self.resolution = int(resolution)
        down = model.vq.config.downsampling
        if self.resolution % down:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the tokenizer's down-sampling {down}")
        self.grid = self.resolution // down
        self.task_ids = dict(task_ids or TASK_TOKEN_IDS)
        self.code_offset = len(tokenizer)  # inference_mmu.py: get_code(image) + len(uni_prompting.text_tokenizer)
        n_codes, vocab = 2 ** model.vq.config.z_channels, model.lm.config.vocab_size
        if self.code_offset + n_codes > vocab:
            raise ValueError(f"image codes need ids {self.code_offset}..{self.code_offset + n_codes - 1} "
                             f"(len(tokenizer) + code) but the LM vocabulary has {vocab}")
        self.last_trace: list[torch.Tensor] | None = None

    # -- inputs -----------------------------------------------------------------------------
    def _chat_ids(self, question: str) -> list[int]:
        """The tokenizer's chat template over one user turn, generation prompt appended (as
        apply_chat_template(tokenize=True) tokenises the rendered text: no extra special tokens)."""
        text = self.tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                            add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def _encode_one(self, image, prompt, response) -> dict:
        if not isinstance(prompt, str):
            raise SampleError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
        pil = to_pil(image)
        given = None
        if response is not None:
            given = list(self.tok.encode(response, add_special_tokens=False))
            if not given:
                raise SampleError("response", "given response is empty")
            if len(given) >= self.response_len:
                raise SampleError("response", f"response has {len(given)} tokens; the canvas holds {self.response_len - 1}")
        x = magvit2.pixels(pil, self.resolution)[None].to(self.device)
        codes = self.model.vq.codes(x)[0]  # float32, no graph: codes are discrete
        t = self.task_ids
        ids = [t["mmu"], t["soi"], *(codes + self.code_offset).tolist(), t["eoi"], *self._chat_ids(prompt)]
        limit = self.model.lm.config.max_position_embeddings
        if len(ids) + self.response_len > limit:
            raise SampleError("prompt", f"prompt + image take {len(ids)} tokens; with the {self.response_len}-token "
                                        f"canvas that exceeds the model's {limit} positions")
        return dict(ids=ids, given=given, size=tuple(np.asarray(image).shape[:2]))

    def prepare(self, images, prompts, responses=None):
        errors, keep, enc = self._encode_all(images, prompts, responses)
        T = max((len(e["ids"]) for e in enc), default=1)
        ids = torch.full((len(enc), T), self.ids["eos"], dtype=torch.long, device=self.device)
        valid = torch.zeros((len(enc), T), dtype=torch.bool, device=self.device)
        spans = []
        for row, e in enumerate(enc):  # left padding: every token keeps its distance to the canvas
            off = T - len(e["ids"])
            ids[row, off:], valid[row, off:] = torch.tensor(e["ids"], device=self.device), True
            spans.append(ImageSpan("lm", off + 2, self.grid, self.grid))  # after <|mmu|> <|soi|>
        with torch.no_grad():
            emb = self.model.lm.embed(ids)
        inputs = {"prefix_ids": ids, "prefix_embeds": emb, "prefix_valid": valid}
        return PreparedBatch(inputs=inputs, spans=spans, prompts=[prompts[i] for i in keep],
                             given_ids=[e["given"] for e in enc], image_sizes=[e["size"] for e in enc],
                             source_index=keep), errors

    def _attention_mask(self, valid, canvas_len):
        full = torch.cat([valid.bool(), torch.ones(valid.shape[0], canvas_len, dtype=torch.bool, device=valid.device)], 1)
        return padding_mask(full)

    def _blank(self, batch: PreparedBatch, rows, image_keep, prefix: torch.Tensor) -> torch.Tensor:
        """Blanked code cells -> the <|mdm_mask|> embedding (see the module docstring)."""
        prefix = prefix.clone()
        masked = self.model.lm.embed(torch.tensor([self.mask_id], device=self.device))[0].to(prefix.dtype)
        for n, i in enumerate(rows.tolist()):
            pos = torch.as_tensor(batch.spans[i].positions().reshape(-1), device=self.device)
            if image_keep.shape[1] != len(pos):
                raise ValueError(f"image_keep has {image_keep.shape[1]} cells per row; sample {i} has a "
                                 f"{batch.spans[i].rows}x{batch.spans[i].cols} grid")
            prefix[n, pos[~image_keep[n].to(self.device).bool()]] = masked
        return prefix

    # -- generation -------------------------------------------------------------------------
    def generate(self, batch, seed=0):
        return self._denoise(batch, seed=seed, forced=None)

    def forced_trajectory(self, batch):
        return self._denoise(batch, seed=0, forced=self._forced_canvas(batch))

    @torch.no_grad()
    def _denoise(self, batch, seed: int, forced: torch.Tensor | None) -> Generation:
        B, L, bl = batch.size, self.response_len, self.block_length
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=self.device)
        commit = torch.full_like(x, -1)
        gens = ([torch.Generator(device=self.device).manual_seed(int(seed)) for _ in range(B)]
                if self.temperature > 0 and forced is None else None)
        trace, s = [], 0
        for blk in range(L // bl):
            for k in uniform_counts(bl, self.gen_steps // (L // bl)):
                masked = x == self.mask_id
                trace.append(x.clone())
                pred, conf = self._propose(self._canvas_logits(batch.inputs, x), masked, forced, gens, (blk + 1) * bl)
                take = top_k_lowest_first(conf, k)
                x = torch.where(take, pred, x)
                commit = torch.where(take, torch.full_like(commit, s), commit)
                s += 1
        self.last_trace = trace
        return Generation(ids=x, commit_step=commit, n_steps=s, source="generated" if forced is None else "given")

    def _canvas_logits(self, inp: dict, canvas: torch.Tensor) -> torch.Tensor:
        """(B, L, V) float32 canvas logits of a full re-encode of [prompt | canvas]."""
        lm = self.model.lm
        valid, L = inp["prefix_valid"], canvas.shape[1]
        x = torch.cat([inp["prefix_embeds"], lm.embed(canvas)], dim=1)
        h = lm.run_layers(x, self._attention_mask(valid, L), lm.rope(x, positions(valid, L)))
        return lm.logits(h[:, -L:]).float()

    # -- tokens -----------------------------------------------------------------------------
    def token_str(self, token_id):
        t = int(token_id)
        if t >= self.code_offset:  # an image code (the reference's decode drops these ids)
            return f"<image_code_{t - self.code_offset}>"
        return self.tok.decode([t], skip_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids if int(i) < self.code_offset], skip_special_tokens=True)

    def is_content(self, token_id):
        return int(token_id) < self.code_offset and super().is_content(token_id)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_cfg: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> MmadaBackend:
        model, tok, source = load_mmada(model_cfg, device, dtype)
        opts = {k: model_cfg[k] for k in ("response_len", "gen_steps", "block_length", "temperature", "resolution")
                if model_cfg.get(k) is not None}
        if "block_length" in model_cfg:  # null = one block of response_len
            opts["block_length"] = model_cfg["block_length"]
        return cls(model, tok, model_id=model_cfg.get("model_id") or str(source).rstrip("/").split("://", 1)[-1],
                   device=device, **opts)


def load_mmada(model_cfg: dict, device: str, dtype: torch.dtype):
    """(MmadaModel, tokenizer, source): the LM directory `source` and the MAGVIT-v2 directory
    `vq_source`, each a local dir, an fsspec URL or a hub id in the local HF cache."""
    from transformers import AutoTokenizer

    from dcam.actors.models.llada_checkpoint import build_empty, load_weights, read_config, tensor_shapes, weight_files
    from dcam.actors.models.loading import CheckpointError, check_remote_code, resolve_checkpoint

    source, vq_source = model_cfg.get("source"), model_cfg.get("vq_source")
    if not source or not vq_source:
        raise CheckpointError("the mmada backend needs model.source (the MMaDA checkpoint: a local dir, an fsspec URL "
                              "or a hub id in the local HF cache) and model.vq_source (the MAGVIT-v2 tokenizer, "
                              "showlab/magvitv2)")
    if model_cfg.get("trust_remote_code"):
        raise CheckpointError("the mmada backend is native: it never runs checkpoint code "
                              "(model.trust_remote_code must stay false)")
    where = dict(cache_dir=model_cfg.get("cache_dir"), storage_options=model_cfg.get("storage_options"),
                 hf_cache_dir=model_cfg.get("hf_cache_dir"))
    local, vq_local = resolve_checkpoint(str(source), **where), resolve_checkpoint(str(vq_source), **where)
    check_remote_code(local, False, native_model_types=MODEL_TYPES)
    check_remote_code(vq_local, False)
    config = read_config(local)
    if config.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"checkpoint {source} has model_type {config.get('model_type')!r}; the mmada backend "
                              f"loads {list(MODEL_TYPES)}")
    files = weight_files(local)
    tensor_shapes(files, REFERENCE_RULES)  # every tensor must map (header reads only)
    try:
        lm = build_empty(lambda c, _tower, dt: LladaLM(LladaLMConfig.from_olmo(c), dt), config, None, dtype, device)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {source}: {type(e).__name__}: {e}") from None
    load_weights(lm, files, REFERENCE_RULES)
    tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
    return MmadaModel(lm, magvit2.load_magvit2(vq_local, device)).to(device), tok, source
