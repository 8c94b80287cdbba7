"""The shipped checkpoint: loads offline, captions held-out scenes above a stable floor.

The floor catches a broken or swapped checkpoint. It is not the acceptance bar of the model
organism (95% exact match): the shipped interim weights measure 84.4% exact / 95.4% per word on
500 held-out scenes (README, "The model organism")."""
from actors.models import load_backend
from actors.models.caption_eval import caption_quality


def test_shipped_weights_caption_held_out_scenes_above_floor():
    backend = load_backend({"backend": "tiny"})
    q = caption_quality(backend.model, backend.tok, seed=2500, n=64)
    assert q["word_acc"] >= 0.90 and q["exact_match"] >= 0.70, q
    assert q["colour_acc"] >= 0.88 and q["shape_acc"] >= 0.80, q
