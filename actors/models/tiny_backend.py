"""Backend protocol implementation for the built-in tiny dMLLM."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from dcam.actors import scenes
from dcam.actors.models.protocol import (
    AttributionOutput,
    Backend,
    Generation,
    ImageSpan,
    PreparedBatch,
    SampleError,
    StructuralStateError,
)
from dcam.actors.models.tiny_dmllm import TinyDMLLM, UnknownWordError, WordTokenizer, denoise, normalise_pixels

SHIPPED_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "tiny")


class TinyBackend(Backend):
    """Hook points: embed, blocks.{i}.in, blocks.{i}.out, blocks.{i}.ln1, blocks.{i}.ln2,
    blocks.{i}.attn, blocks.{i}.mlp, final_norm. All live in the single LM stream."""

    def __init__(self, model: TinyDMLLM, tokenizer: WordTokenizer, model_id: str = "dcam-tiny",
                 gen_steps: int | None = None, block_length: int | None = None, temperature: float = 0.0,
                 device: str = "cpu"):
        self.model = model.eval().to(device)
        self.model.requires_grad_(False)  # frozen: gradients are taken w.r.t. activations only
        self.tok = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        c = model.config
        self.mask_id, self.eos_id, self.pad_id = tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id
        self.response_len = c.response_len
        self.gen_steps = gen_steps or c.gen_steps
        self.block_length = block_length
        self.temperature = temperature
        self._categories = {w: "colour" for w in scenes.COLOURS} | {w: "shape" for w in scenes.SHAPES}

    @classmethod
    def load(cls, source: str | None = None, trust_remote_code: bool = False, storage_options: dict | None = None,
             cache_dir: str | None = None, **kwargs) -> "TinyBackend":
        from dcam.actors.models.loading import check_remote_code, resolve_checkpoint

        local = (resolve_checkpoint(source, cache_dir=cache_dir, storage_options=storage_options) if source
                 else SHIPPED_WEIGHTS)
        check_remote_code(local, trust_remote_code)
        model = TinyDMLLM.from_pretrained(local)
        return cls(model, WordTokenizer.from_pretrained(local), **kwargs)

    # -- inputs -----------------------------------------------------------------------------
    def _pixels(self, image: np.ndarray) -> np.ndarray:
        size = self.model.config.image_size
        if image.shape[:2] != (size, size):  # the tiny model's processor: squash to S x S
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        return image

    def _encode_one(self, prompt: str, response: str | None):
        c = self.model.config
        try:
            p = self.tok.encode(prompt)
        except UnknownWordError as e:
            raise SampleError("prompt", f"prompt: {e}") from None
        if len(p) > c.max_prompt_len:
            raise SampleError("prompt", f"prompt has {len(p)} tokens; the model's prompt context holds {c.max_prompt_len}")
        if response is None:
            return p, None
        try:
            r = self.tok.encode(response)
        except UnknownWordError as e:
            raise SampleError("response", f"response: {e}") from None
        if not r:
            raise SampleError("response", "given response is empty")
        if len(r) >= c.response_len:
            raise SampleError("response", f"response has {len(r)} tokens; the canvas holds {c.response_len - 1}")
        return p, r

    def prepare(self, images, prompts, responses=None):
        c = self.model.config
        responses = responses if responses is not None else [None] * len(images)
        errors, keep, enc = {}, [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                enc.append(self._encode_one(prompt, response))
                keep.append(i)
            except SampleError as e:
                errors[i] = e
        pix = [self._pixels(images[i]) for i in keep]
        prompt_ids = torch.full((len(keep), c.max_prompt_len), self.pad_id, dtype=torch.long)
        for row, (p, _) in enumerate(enc):
            if p:
                prompt_ids[row, c.max_prompt_len - len(p):] = torch.tensor(p)
        pixels = normalise_pixels(torch.from_numpy(np.stack(pix))) if pix else torch.zeros(0, 3, c.image_size, c.image_size)
        span = ImageSpan(stream="lm", start=self.model.image_start, rows=c.grid, cols=c.grid)
        batch = PreparedBatch(
            inputs={"pixel_values": pixels.to(self.device, self.model.dtype), "prompt_ids": prompt_ids.to(self.device)},
            spans=[span] * len(keep), prompts=[prompts[i] for i in keep], given_ids=[r for _, r in enc],
            image_sizes=[tuple(images[i].shape[:2]) for i in keep], source_index=keep)
        return batch, errors

    # -- denoising --------------------------------------------------------------------------
    def generate(self, batch, seed=0):
        g = torch.Generator(device=self.device).manual_seed(seed) if self.temperature > 0 else None
        t = denoise(self.model, batch.inputs["pixel_values"], batch.inputs["prompt_ids"], steps=self.gen_steps,
                    block_length=self.block_length, temperature=self.temperature, generator=g)
        return Generation(ids=t.ids, commit_step=t.commit_step, n_steps=t.n_steps, source="generated")

    def forced_trajectory(self, batch):
        L = self.response_len
        forced = torch.full((batch.size, L), self.eos_id, dtype=torch.long, device=self.device)
        for i, ids in enumerate(batch.given_ids):
            if ids is None:
                raise ValueError("forced_trajectory needs a given response for every sample")
            forced[i, :len(ids)] = torch.tensor(ids)
        t = denoise(self.model, batch.inputs["pixel_values"], batch.inputs["prompt_ids"], steps=self.gen_steps,
                    block_length=self.block_length, forced_ids=forced)
        return Generation(ids=t.ids, commit_step=t.commit_step, n_steps=t.n_steps, source="given")

    # -- attribution ------------------------------------------------------------------------
    def hook_points(self):
        pts = ["embed", "final_norm"]
        for i in range(self.model.config.n_layers):
            pts += [f"blocks.{i}.{p}" for p in ("in", "out", "ln1", "ln2", "attn", "mlp")]
        return pts

    def named_hooks(self):
        n = self.model.config.n_layers
        mid, early = max(0, n // 2 - 1), max(0, -(-n // 4) - 1)  # middle block; block at a quarter of the depth
        return {"early": f"blocks.{early}.out", "mid": f"blocks.{mid}.out", "mid_norm2": f"blocks.{mid}.ln2"}

    def hook_stream(self, hook):
        if hook not in self.hook_points():
            raise KeyError(f"unknown hook point {hook!r}; known: {self.hook_points()}")
        return "lm"

    def _module_for(self, hook: str):
        if hook == "final_norm":
            return self.model.ln_f, False
        _, i, part = hook.split(".")
        block = self.model.blocks[int(i)]
        if part in ("in", "out"):
            return block, part == "in"
        return getattr(block, part), False

    def _image_features(self, batch) -> torch.Tensor:
        """(B, G*G, d) projected image tokens of every sample of the batch, computed once per model
        and batch: attribution and faithfulness passes repeat a sample over many rows (tokens x
        curve steps), and the vision tower is outside the explained graph anyway."""
        model, feats = batch.cache.get("image_features", (None, None))
        if model is not self.model:  # one batch may go through two models (eval-cam's untrained row)
            with torch.no_grad():
                feats = self.model.image_features(batch.inputs["pixel_values"])
            batch.cache["image_features"] = (self.model, feats)
        return feats

    def reaches_canvas(self, hook: str) -> bool:
        """Whether image states at this hook can change the canvas logits: only through the keys and
        values of a later block (computed from its ln1 input), so nothing after the last block's
        attention input does (its out / ln2 / attn / mlp and final_norm)."""
        if hook in ("embed",):
            return True
        if hook == "final_norm":
            return False
        _, i, part = hook.split(".")
        return part in ("in", "ln1") or int(i) < self.model.config.n_layers - 1

    def attribution_forward(self, batch, rows, canvas, hooks, image_keep=None):
        for h in hooks:
            self.hook_stream(h)  # KeyError for unknown names
        dead = [h for h in hooks if not self.reaches_canvas(h)] if torch.is_grad_enabled() else []
        if dead:
            raise StructuralStateError(
                f"hook(s) {dead}: the canvas logits read image states only through the keys and values of each "
                f"block, so states after the last block's attention input never reach them (identically zero "
                f"gradient); hook blocks.<i>.out with i < {self.model.config.n_layers - 1}")
        m = self.model
        pixels = batch.inputs["pixel_values"][rows]
        prompt_ids = batch.inputs["prompt_ids"][rows]
        image = self._image_features(batch)[rows]
        if image_keep is not None:  # a blanked token keeps its position and type, loses its content
            blank = (m.type_emb[1] + m.pos_2d).expand_as(image)
            image = torch.where(image_keep[..., None], image, blank)
        if not hooks and not torch.is_grad_enabled() and m.config.prefix_lm:
            # Logits only (faithfulness curves): the last block's prompt and image positions
            # are needed for their keys and values alone (see TinyDMLLM.prefix_cache).
            logits = m.canvas_logits(prompt_ids, canvas, m.prefix_cache(prompt_ids, image))
            return AttributionOutput(logits=logits, activations={})
        x = m.embed(pixels, prompt_ids, canvas, image_embeds=image)
        if torch.is_grad_enabled():  # the graph starts at the LM input: the vision tower is not explained
            x = x.detach().requires_grad_(True)
        acts, handles = {}, []
        for hook in hooks:
            if hook == "embed":
                acts[hook] = x
                continue
            module, is_input = self._module_for(hook)
            if is_input:
                handles.append(module.register_forward_pre_hook(lambda mod, args, h=hook: acts.__setitem__(h, args[0])))
            else:
                handles.append(module.register_forward_hook(lambda mod, a, out, h=hook: acts.__setitem__(h, out)))
        try:
            logits = m(pixel_values=None, prompt_ids=prompt_ids, canvas_ids=canvas, inputs_embeds=x)
        finally:
            for h in handles:
                h.remove()
        return AttributionOutput(logits=logits, activations=acts)

    def unembed(self, hidden):
        return self.model.head(hidden)

    # -- tokens -----------------------------------------------------------------------------
    def token_str(self, token_id):
        return self.tok.token_str(token_id)

    def decode(self, ids):
        return self.tok.decode(ids)

    def word_category(self, token_id):
        return self._categories.get(self.tok.token_str(token_id))

    def category_members(self, category):
        return [self.tok.index[w] for w, c in self._categories.items() if c == category]

    def is_content(self, token_id):
        return self.word_category(token_id) is not None

    def word_type(self, token_id):
        w = self.tok.token_str(token_id)
        return self._categories.get(w) or ("function" if w in scenes.FUNCTION_WORDS else None)
