"""Plain references on the model organism shared by the probe tests (not a test module)."""
from __future__ import annotations

import numpy as np
import torch


def loop_probability(backend, batch, t, keep: np.ndarray) -> float:
    """P(t.token_id at t.position) from one full-sequence forward of the tiny model (no prefix
    cache, no batching), image cells where keep is False blanked to their type and 2-D position
    embedding only (the blanking restated, not imported)."""
    m = backend.model
    pixels, prompt = batch.inputs["pixel_values"][t.sample:t.sample + 1], batch.inputs["prompt_ids"][t.sample:t.sample + 1]
    with torch.no_grad():
        image = m.image_features(pixels)[0]
        image = torch.stack([image[c] if keep[c] else m.type_emb[1] + m.pos_2d[c] for c in range(len(keep))])[None]
        logits = m(None, prompt, t.canvas[None], inputs_embeds=m.embed(None, prompt, t.canvas[None], image_embeds=image))
    return float(logits[0, t.position].double().softmax(-1)[t.token_id])
