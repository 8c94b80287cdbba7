"""The dcam Backend shared by LaViDa and LLaDA-V: inputs, hooks, the attribution forward, tokens.

Subclasses say how the model attends (`_attention_mask`: LaViDa's prefix-DLM or LLaDA-V's plain
bidirectional mask) and how it denoises (`generate`, `forced_trajectory`).

Inputs (`PreparedBatch.inputs`, batch-first, left-padded prefixes):
  prefix_embeds (B, T, D)  the LM input over [prompt with the image block spliced in] (the vision
                           tower runs once per sample, here, never inside an attribution graph)
  prefix_valid  (B, T)     False on left padding
  image_start   (B,)       sequence position of the image block
  image_geometry (B, 4)    (W, H, tiles_w, tiles_h) of each image, to rebuild blank image blocks

Hook points (all in the single "lm" stream), with the boundary index b a hook sits at:
  embed (b=0): the LM input, text embeddings with the image block spliced in;
  layers.{i}.in (b=i), layers.{i}.out (b=i+1): the residual stream entering / leaving block i;
  layers.{i}.ln1 / .attn / .ln2 / .mlp: input_layernorm, attention output, post_attention_layernorm,
  MLP output of block i; final_norm: the final RMSNorm (TAM's logit lens).
Blocks below the lowest hooked boundary run without a graph (the graph starts there).

Structural validity: the canvas logits read the image positions only through the keys and values
of each block, computed from that block's *input*. So the image states after the last block
(layers.{n-1}.out, its attn / ln2 / mlp, final_norm) never reach the canvas logits: their gradient
is identically zero, and asking for it raises StructuralStateError (a forward-only read, as TAM's
final_norm, is fine).

Faithfulness blanking (`image_keep`): a blanked cell's token is replaced by the token the model
makes of a mid-grey image (all-zero normalised pixels) at the same cell: same view, position and
newline layout, no image content. Only the cells of the explained view (`image_view`) are blanked;
the other view keeps its content (a deletion curve measures the view's own contribution).
"""
from __future__ import annotations

import unicodedata

import numpy as np
import torch

from dcam.actors.models import anyres
from dcam.actors.models.llada_lm import positions
from dcam.actors.models.llada_mm import IMAGE_TOKEN_INDEX, ImageBlock, LladaMultimodal, prompt_ids, special_ids, to_pil
from dcam.actors.models.protocol import (
    AttributionOutput,
    Backend,
    ImageSpan,
    PreparedBatch,
    SampleError,
    StructuralStateError,
)
from dcam.actors.models.remasking import propose

PARTS = ("in", "out", "ln1", "attn", "ln2", "mlp")
_PART_MODULE = {"ln1": "input_layernorm", "attn": "self_attn", "ln2": "post_attention_layernorm", "mlp": "mlp"}
IMAGE_VIEWS = ("grid", "base")


class LladaFamilyBackend(Backend):
    """Backend protocol over a `LladaMultimodal`; see the module docstring."""

    model_id: str

    def __init__(self, model: LladaMultimodal, tokenizer, model_id: str, device: str = "cpu",
                 response_len: int = 64, image_view: str = "grid"):
        if image_view not in IMAGE_VIEWS:
            raise ValueError(f"image_view must be one of {IMAGE_VIEWS}, got {image_view!r}")
        self.model = model.eval().to(device)
        self.model.requires_grad_(False)  # frozen: gradients are taken w.r.t. activations only
        self.tok = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        self.response_len = int(response_len)
        self.image_view = image_view
        self.ids = special_ids(tokenizer)
        self.mask_id = self.ids["mask"]
        self.eos_id, self.eos_ids = self.ids["eot"], (self.ids["eot"], self.ids["eos"])
        self.n_layers = model.lm.config.num_layers
        self._special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(self.ids.values())
        self._grey: torch.Tensor | None = None

    # -- inputs -----------------------------------------------------------------------------
    def _encode_one(self, image, prompt, response) -> dict:
        if not isinstance(prompt, str):
            raise SampleError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
        pil = to_pil(image)
        lay = self.model.layout
        views, tiles = anyres.anyres_views(pil, lay.pinpoints, lay.tile)
        ids = prompt_ids(self.tok, prompt)
        given = None
        if response is not None:
            given = list(self.tok.encode(response, add_special_tokens=False))
            if not given:
                raise SampleError("response", "given response is empty")
            if len(given) >= self.response_len:
                raise SampleError("response", f"response has {len(given)} tokens; the canvas holds {self.response_len - 1}")
        with torch.no_grad():  # the vision tower runs once per sample, never in an attribution graph
            feats = self.model.view_features(torch.from_numpy(views).to(self.device, self.model.dtype))
            block = self.model.merge(feats, pil.size, tiles)
        n = len(ids) - 1 + block.tokens.shape[0]
        limit = self.model.lm.config.max_position_embeddings
        if n + self.response_len > limit:
            raise SampleError("prompt", f"prompt + image take {n} tokens; with the {self.response_len}-token canvas "
                                        f"that exceeds the model's {limit} positions")
        return dict(ids=ids, block=block, tiles=tiles, given=given, size=tuple(np.asarray(image).shape[:2]))

    def _splice(self, ids: list[int], block: ImageBlock) -> tuple[torch.Tensor, int]:
        """(T_i, D) prefix embeddings with the image block at the placeholder, and the block's start."""
        at = ids.index(IMAGE_TOKEN_INDEX)
        emb = self.model.lm.embed(torch.tensor([i for i in ids if i != IMAGE_TOKEN_INDEX], device=self.device))
        return torch.cat([emb[:at], block.tokens.to(emb.dtype), emb[at:]]), at

    def _span(self, start: int, block: ImageBlock) -> ImageSpan:
        if self.image_view == "base":
            return ImageSpan("lm", start, block.base_side, block.base_side)
        return ImageSpan("lm", start + block.grid_offset(), block.grid_rows, block.grid_cols,
                         row_stride=block.grid_cols + 1)

    def _encode_all(self, images, prompts, responses=None) -> tuple[dict, list[int], list[dict]]:
        """(errors by input index, kept input indices, their encodings): `_encode_one` per sample, a
        sample that cannot be encoded becomes an error, never the batch's."""
        responses = responses if responses is not None else [None] * len(images)
        errors, keep, enc = {}, [], []
        for i, (image, prompt, response) in enumerate(zip(images, prompts, responses)):
            try:
                enc.append(self._encode_one(image, prompt, response))
                keep.append(i)
            except SampleError as e:
                errors[i] = e
        return errors, keep, enc

    def _propose(self, logits, masked, forced, gens, block_end: int):
        """(proposal ids, confidence) of one pass (remasking.propose): -inf confidence where not masked
        or past the current block."""
        pred, conf = propose(logits, masked, forced, gens, self.temperature, self.device)
        conf[:, block_end:] = float("-inf")
        return pred, conf

    def prepare(self, images, prompts, responses=None):
        errors, keep, enc = self._encode_all(images, prompts, responses)
        parts = [self._splice(e["ids"], e["block"]) for e in enc]
        T = max((p.shape[0] for p, _ in parts), default=1)
        D = self.model.lm.config.hidden_size
        emb = torch.zeros((len(enc), T, D), dtype=self.model.dtype, device=self.device)
        valid = torch.zeros((len(enc), T), dtype=torch.bool, device=self.device)
        start = torch.zeros(len(enc), dtype=torch.long)
        geom = torch.zeros((len(enc), 4), dtype=torch.long)
        spans = []
        for row, ((p, at), e) in enumerate(zip(parts, enc)):  # left padding: every token keeps its distance to the canvas
            off = T - p.shape[0]
            emb[row, off:], valid[row, off:] = p, True
            start[row] = off + at
            geom[row] = torch.tensor([*e["block"].size, *e["tiles"]])
            spans.append(self._span(off + at, e["block"]))
        inputs = {"prefix_embeds": emb, "prefix_valid": valid, "image_start": start.to(self.device),
                  "image_geometry": geom.to(self.device)}
        return PreparedBatch(inputs=inputs, spans=spans, prompts=[prompts[i] for i in keep],
                             given_ids=[e["given"] for e in enc], image_sizes=[e["size"] for e in enc],
                             source_index=keep), errors

    def _forced_canvas(self, batch: PreparedBatch) -> torch.Tensor:
        """(B, L) the given responses, then <|eot_id|>, then <|endoftext|> (LLaDA's SFT padding)."""
        forced = torch.full((batch.size, self.response_len), self.ids["eos"], dtype=torch.long, device=self.device)
        for i, ids in enumerate(batch.given_ids):
            if ids is None:
                raise ValueError("forced_trajectory needs a given response for every sample")
            forced[i, :len(ids)] = torch.tensor(ids, device=self.device)
            forced[i, len(ids)] = self.ids["eot"]
        return forced

    # -- attention (model-specific) ---------------------------------------------------------
    def _attention_mask(self, valid: torch.Tensor, canvas_len: int) -> torch.Tensor:
        """Bool attention mask (True = may attend) of one full [prefix | canvas] pass, (N, 1, Q or 1, T+L)."""
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------------
    def hook_points(self):
        return ["embed", "final_norm"] + [f"layers.{i}.{p}" for i in range(self.n_layers) for p in PARTS]

    def named_hooks(self):
        n = self.n_layers
        mid, early = max(0, n // 2 - 1), max(0, -(-n // 4) - 1)  # middle block; block at a quarter of the depth
        return {"early": f"layers.{early}.out", "mid": f"layers.{mid}.out", "mid_norm2": f"layers.{mid}.ln2"}

    def hook_stream(self, hook):
        if hook not in set(self.hook_points()):
            raise KeyError(f"unknown hook point {hook!r}; known: embed, final_norm, "
                           f"layers.<0..{self.n_layers - 1}>.{{{','.join(PARTS)}}}")
        return "lm"

    def _boundary(self, hook: str) -> int:
        """Index of the residual-stream boundary a hook needs (the first block that must run with a graph)."""
        if hook == "embed":
            return 0
        if hook == "final_norm":
            return self.n_layers
        _, i, part = hook.split(".")
        return int(i) + 1 if part == "out" else int(i)

    def reaches_canvas(self, hook: str) -> bool:
        """Whether image states at this hook can change the canvas logits (only through later K/V)."""
        if hook == "final_norm":
            return False
        if hook == "embed":
            return True
        _, i, part = hook.split(".")
        return part in ("in", "ln1") or int(i) < self.n_layers - 1

    # -- attribution ------------------------------------------------------------------------
    def attribution_forward(self, batch, rows, canvas, hooks, image_keep=None):
        for h in hooks:
            self.hook_stream(h)
        grad = torch.is_grad_enabled()
        dead = [h for h in hooks if not self.reaches_canvas(h)] if grad else []
        if dead:
            raise StructuralStateError(
                f"hook(s) {dead}: the canvas logits read image states only through the keys and values of each "
                f"block, so states after the last block (layers.{self.n_layers - 1}.out/attn/ln2/mlp, final_norm) "
                f"never reach them (identically zero gradient); hook layers.<i>.out with i < {self.n_layers - 1}")
        lm, inp = self.model.lm, batch.inputs
        rows, canvas = rows.to(self.device), canvas.to(self.device)
        prefix = inp["prefix_embeds"][rows]
        if image_keep is not None:
            prefix = self._blank(batch, rows, image_keep, prefix)
        valid, L, T = inp["prefix_valid"][rows], canvas.shape[1], prefix.shape[1]
        x = torch.cat([prefix, lm.embed(canvas)], dim=1)
        mask = self._attention_mask(valid, L)
        rope = lm.rope(x, positions(valid, L))
        split = min((self._boundary(h) for h in hooks), default=self.n_layers) if grad else 0
        with torch.no_grad():
            h = lm.run_layers(x, mask, rope, 0, split)
        if grad:
            h = h.detach().requires_grad_(True)
        acts, handles = {}, []
        taps = self._taps(hooks, split, h, acts, handles)
        try:
            h = lm.run_layers(h, mask, rope, split, None, taps=taps)
        finally:
            for hd in handles:
                hd.remove()
        if "final_norm" in hooks:
            acts["final_norm"] = lm.model.norm(h)
        return AttributionOutput(logits=lm.logits(h[:, T:]), activations=acts)

    def _taps(self, hooks, split: int, h0: torch.Tensor, acts: dict, handles: list) -> dict:
        """Boundary taps {layer index: callback} for in/out hooks and module hooks for parts."""
        taps = {}
        for hook in hooks:
            if hook == "final_norm":
                continue
            b = self._boundary(hook)
            part = hook.rsplit(".", 1)[-1]
            if hook == "embed" or part in ("in", "out"):
                if b == split:
                    acts[hook] = h0
                else:
                    prev = taps.get(b - 1)
                    taps[b - 1] = (lambda i, h, k=hook, p=prev: (acts.__setitem__(k, h), p(i, h) if p else h)[1])
                continue
            mod = getattr(self.model.lm.layers[b], _PART_MODULE[part])
            handles.append(mod.register_forward_hook(
                lambda m, a, out, k=hook: acts.__setitem__(k, out[0] if isinstance(out, tuple) else out)))
        return taps

    def _grey_features(self) -> torch.Tensor:
        """(1, k, k, D) the view features of a mid-grey tile (normalised pixels all zero), computed once."""
        if self._grey is None:
            t = self.model.layout.tile
            with torch.no_grad():
                self._grey = self.model.view_features(torch.zeros((1, 3, t, t), device=self.device,
                                                                  dtype=self.model.dtype))
        return self._grey

    def _blank_block(self, batch: PreparedBatch, i: int) -> torch.Tensor:
        """Sample i's image block made of grey views (same geometry), cached on the batch."""
        cache = batch.cache.setdefault("blank_blocks", {})
        if i not in cache:
            w, h, tw, th = (int(v) for v in batch.inputs["image_geometry"][i])
            grey = self._grey_features().expand(1 + tw * th, -1, -1, -1)
            with torch.no_grad():
                cache[i] = self.model.merge(grey, (w, h), (tw, th)).tokens
        return cache[i]

    def _blank(self, batch, rows, image_keep, prefix: torch.Tensor) -> torch.Tensor:
        prefix = prefix.clone()
        for n, i in enumerate(rows.tolist()):
            pos = torch.as_tensor(batch.spans[i].positions().reshape(-1), device=self.device)
            if image_keep.shape[1] != len(pos):
                raise ValueError(f"image_keep has {image_keep.shape[1]} cells per row; sample {i} has a "
                                 f"{batch.spans[i].rows}x{batch.spans[i].cols} grid")
            drop = pos[~image_keep[n].to(self.device).bool()]
            start = int(batch.inputs["image_start"][i])
            prefix[n, drop] = self._blank_block(batch, i)[drop - start].to(prefix.dtype)
        return prefix

    def unembed(self, hidden):
        return self.model.lm.lm_head(hidden)

    # -- tokens -----------------------------------------------------------------------------
    def token_str(self, token_id):
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def is_content(self, token_id):
        """Not a special token, not whitespace or pure punctuation."""
        if int(token_id) in self._special:
            return False
        s = self.token_str(token_id).strip()
        return any(ch.isalnum() for ch in s) and not all(unicodedata.category(ch).startswith("P") for ch in s)

