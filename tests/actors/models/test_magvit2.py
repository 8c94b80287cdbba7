"""MAGVIT-v2 tokenizer: parity with the reference encoder + lookup-free quantiser (vendored codes of
fixed images on the fixture's tiny random configuration), the pixel transform, the key mapping and
the released architecture read from the reference's full key list, and loading refusals."""
import hashlib
import re

import numpy as np
import pytest
import torch
from mmada_testing import TINY_VQ, fixture, lfq_buffers, reference_image, vq_reference_shapes, write_vq_checkpoint
from PIL import Image
from seeded_weights import seeded_weights

from dcam.actors.models import magvit2
from dcam.actors.models.loading import CheckpointError

CODES = fixture("magvit2_codes.json")


@pytest.fixture(scope="module")
def encoder():
    state = seeded_weights({k: tuple(v) for k, v in CODES["shapes"].items()}, CODES["seed"])
    shapes = {k[len("encoder."):]: tuple(v.shape) for k, v in state.items()}
    model = magvit2.Magvit2Encoder(magvit2.Magvit2Config.from_shapes(shapes))
    model.load_state_dict({k[len("encoder."):]: v for k, v in state.items()}, strict=True)
    return model.eval()


def test_the_fixture_was_made_with_the_configuration_the_helpers_describe():
    assert CODES["vq_config"] == TINY_VQ
    assert {k: tuple(v) for k, v in CODES["shapes"].items()} == vq_reference_shapes(TINY_VQ)


@pytest.mark.parametrize("k", range(len(CODES["images"])))
def test_pixels_and_codes_match_the_reference(encoder, k):
    """Bit-exact pixels (squash transform; crop of a square image), then exactly the reference's codes."""
    im = CODES["images"][k]
    pil = Image.fromarray(reference_image(im["width"], im["height"], im["seed"]))
    if im["transform"] == "crop" and im["width"] != im["height"]:
        pytest.skip("the centre-crop transform is not offered (its codes cover only the centre square)")
    x = magvit2.pixels(pil, im["resolution"])[None]
    assert hashlib.sha256(x.numpy().astype("<f4").tobytes()).hexdigest() == im["pixel_sha256"]
    with torch.no_grad():
        z = encoder(x)
    assert list(z.shape[2:]) == im["grid"] == [im["resolution"] // 16] * 2
    assert abs(float(z.double().sum()) - im["z_sum"]) < 1e-3
    assert encoder.codes(x)[0].tolist() == im["codes"]


def test_lfq_codes_are_most_significant_bit_first_and_zero_is_a_zero_bit():
    z = torch.full((1, 13, 1, 3), -1.0)
    z[0, 0, 0, 0] = 0.5  # channel 0 set: the top bit
    z[0, 12, 0, 1] = 2.0  # channel 12 set: the lowest bit
    z[0, :, 0, 2] = 0.0  # exactly zero: no bit (the reference's z > 0)
    assert magvit2.lfq_codes(z).flatten().tolist() == [4096, 1, 0]
    emb = lfq_buffers(13)["quantize.embedding"]  # the reference's code -> +-1 table inverts it
    codes = torch.tensor([0, 1, 4096, 8191, 1234])
    assert magvit2.lfq_codes(emb[codes].T[None, :, None, :])[0, 0].tolist() == codes.tolist()


def test_released_architecture_from_the_reference_key_list():
    """The public MAGVIT-v2 state dict (reference MAGVITv2(), vendored key list): every encoder key
    maps onto the native encoder built from those shapes, 1:1, and the config is the released one."""
    public = {k: tuple(v) for k, v in CODES["public_state_dict"].items()}
    enc = {k[len("encoder."):]: v for k, v in public.items() if k.startswith("encoder.")}
    cfg = magvit2.Magvit2Config.from_shapes(enc)
    assert cfg == magvit2.Magvit2Config() and cfg.downsampling == 16
    with torch.device("meta"):
        native = {k: tuple(v.shape) for k, v in magvit2.Magvit2Encoder(cfg).state_dict().items()}
    assert native == enc
    rest = [k for k in public if not k.startswith("encoder.")]
    assert rest and all(any(re.match(p, k) for p in magvit2.SKIPPED) for k in rest)


def test_load_from_a_checkpoint_directory_and_refusals(tmp_path, encoder):
    d = write_vq_checkpoint(tmp_path / "vq", seed=CODES["seed"])
    loaded = magvit2.load_magvit2(d)
    x = magvit2.pixels(Image.fromarray(reference_image(200, 120, 6)), 128)[None]
    assert torch.equal(loaded.codes(x), encoder.codes(x))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never unpickles"):
        magvit2.load_magvit2(str(tmp_path / "empty"))
    bad = write_vq_checkpoint(tmp_path / "bad", seed=1)
    from safetensors.torch import load_file, save_file
    st = load_file(f"{bad}/pytorch_model.safetensors")  # a different bit order: refused, not other codes
    st["quantize.power_vals"] = st["quantize.power_vals"].flip(0)
    save_file(st, f"{bad}/pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="bit order"):
        magvit2.load_magvit2(bad)
    st.pop("quantize.power_vals")
    st["text.head.weight"] = torch.zeros(2)
    save_file(st, f"{bad}/pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="not MAGVIT-v2's"):
        magvit2.load_magvit2(bad)


def test_pixels_of_an_image_already_at_the_resolution_are_not_resampled():
    img = reference_image(64, 64, 3)
    x = magvit2.pixels(Image.fromarray(img), 64)
    np.testing.assert_array_equal(((x.permute(1, 2, 0) * 0.5 + 0.5) * 255).round().numpy().astype(np.uint8), img)
