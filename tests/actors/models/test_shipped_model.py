"""The shipped checkpoint: loads offline, captions held-out scenes above a stable floor.

The floor catches a broken or swapped checkpoint; it sits below the acceptance bar of the model
organism (>= 95% exact match on 500 held-out scenes; measured 98.6%, README "The model organism")
so that an unlucky 64-scene sample cannot fail it. On seed 2500 the shipped weights score 64/64."""
from dcam.actors.models import load_backend
from dcam.evals.eval_tiny import caption_quality


def test_shipped_weights_caption_held_out_scenes_above_floor():
    backend = load_backend({"backend": "tiny"})
    q = caption_quality(backend.model, backend.tok, seed=2500, n=64)
    assert q["exact_match"] >= 0.90 and q["word_acc"] >= 0.97, q
    assert q["colour_acc"] >= 0.95 and q["shape_acc"] >= 0.95, q


def test_shipped_checkpoint_is_the_documented_architecture():
    backend = load_backend({"backend": "tiny"})
    c = backend.model.config
    assert (c.image_size, c.grid, c.prefix_lm, c.vision_layers) == (64, 8, True, 2)
