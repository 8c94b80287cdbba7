"""MAGVIT-v2 image tokenizer for understanding (MMaDA), native: encoder + lookup-free quantiser.

What MMaDA runs before its LM (Gen-Verse/MMaDA models/modeling_magvitv2.py, common_modules.py;
weights showlab/magvitv2): a VQGAN encoder (taming-transformers layout) whose 13 output channels
are quantised by sign, one bit each: code = sum_c [z_c > 0] * 2^(12 - c) (channel 0 is the most
significant bit; z = 0 is bit 0), so 8192 codes. The released encoder: ch 128, ch_mult
[1, 2, 2, 4, 4], res blocks [4, 3, 4, 3, 4], no attention in the down path (attn_resolutions [5]
is never reached), x16 down-sampling: a 512 x 512 image -> 32 x 32 codes, raster order (row-major).
The LM sees code c as token len(text tokenizer) + c (126349 + c for MMaDA-8B).

Encoder (names = the checkpoint's, minus "encoder."):
  conv_in 3x3 -> per level l: block.{b} = ResnetBlock (GroupNorm(32, eps 1e-6), swish, conv3x3,
  GroupNorm, swish, conv3x3, + 1x1 nin_shortcut when channels change), attn.{b} after each block
  when present, downsample.conv (pad right/bottom by 1, 3x3 stride 2) except on the last level ->
  mid.block_1, mid.attn_1 (single-head spatial self-attention), mid.block_2 -> norm_out, swish,
  conv_out 3x3 -> quant_conv 1x1.
The architecture is read from the checkpoint's tensor shapes (its config.json, written by the
reference's diffusers mixin, holds no sizes). decoder.* (image generation) and the quantiser's
buffers are not needed: the buffers are checked (bit order), the decoder is skipped.

Pixels: the reference's image_transform_squash (torchvision Resize((r, r), BICUBIC) of the PIL
image, ToTensor, Normalize(0.5, 0.5)) -- the whole image, so a code cell covers a fixed image
region. app.py's image_transform (resize the short side + centre crop) gives the same pixels for
square images; for other shapes its codes cover only the centre square, so dcam does not offer it.
The encoder always runs in float32, as the reference does (outside its bf16 autocast).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

NORM_GROUPS, NORM_EPS = 32, 1e-6
# checkpoint key -> native key (this module); SKIPPED keys are read but not loaded
REFERENCE_RULES = ((r"^encoder\.(.+)$", r"\1"),)
SKIPPED = (r"^decoder\.", r"^quantize\.(embedding|power_vals)$")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, c, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1-conv projections, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k, v = self.k(h).reshape(b, c, hh * ww), self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # (b, query, key)
        return x + self.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


@dataclass(frozen=True)
class Magvit2Config:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    attn_levels: tuple[bool, ...] = (False,) * 5  # levels with an attention block after each res block
    z_channels: int = 13
    in_ch: int = 3

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> Magvit2Config:
        """The architecture from native-named encoder tensor shapes (a checkpoint header)."""
        ch, in_ch = shapes["conv_in.weight"][:2]
        levels = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"down\.(\d+)\.", k)))
        mult, nres, attn = [], [], []
        for lvl in range(levels):
            blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"down\.{lvl}\.block\.(\d+)\.", k))}
            nres.append(len(blocks))
            mult.append(shapes[f"down.{lvl}.block.{max(blocks)}.conv2.weight"][0] // ch)
            attn.append(f"down.{lvl}.attn.0.q.weight" in shapes)
        return cls(ch=ch, ch_mult=tuple(mult), num_res_blocks=tuple(nres), attn_levels=tuple(attn),
                   z_channels=shapes["conv_out.weight"][0], in_ch=in_ch)


class Magvit2Encoder(nn.Module):
    """MAGVIT-v2's VQGANEncoder (reference names) with the lookup-free quantiser as `codes`."""

    def __init__(self, config: Magvit2Config = Magvit2Config()):
        super().__init__()
        self.config = c = config
        self.conv_in = nn.Conv2d(c.in_ch, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = c.ch
        for lvl, m in enumerate(c.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(c.num_res_blocks[lvl]):
                level.block.append(ResnetBlock(cin, c.ch * m))
                cin = c.ch * m
                if c.attn_levels[lvl]:
                    level.attn.append(AttnBlock(cin))
            if lvl != len(c.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, z_channels, H / 16, W / 16) pre-quantisation latents."""
        h = self.conv_in(x)
        for lvl, level in enumerate(self.down):
            for b, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[b](h)
            if lvl != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h * w) int64 codes in raster order (MAGVITv2.get_code)."""
        return lfq_codes(self(pixels)).flatten(1)


def lfq_codes(z: torch.Tensor) -> torch.Tensor:
    """Lookup-free quantisation of (B, C, h, w) latents: bit c = z_c > 0, channel 0 most significant."""
    C = z.shape[1]
    weights = 2 ** torch.arange(C - 1, -1, -1, device=z.device)
    return ((z > 0).long() * weights[None, :, None, None]).sum(1)


def pixels(image: Image.Image, resolution: int = 512) -> torch.Tensor:
    """(3, r, r) float32: the reference's image_transform_squash (bicubic resize of the whole image,
    ToTensor, Normalize(0.5, 0.5)) -- PIL's resize, exactly what torchvision's does for a PIL image."""
    img = image.convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return x.sub_(0.5).div_(0.5)


# -- loading ----------------------------------------------------------------------------------------
def load_magvit2(local: str, device: str = "cpu") -> Magvit2Encoder:
    """The encoder from a MAGVIT-v2 checkpoint directory (*.safetensors: encoder.*, decoder.*,
    quantize.*), float32. Every encoder parameter must come from exactly one tensor."""
    from safetensors import safe_open

    from dcam.actors.models.loading import CheckpointError

    files = sorted(glob.glob(os.path.join(local, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(local, "*.bin"))
        raise CheckpointError(f"no *.safetensors weights in MAGVIT-v2 directory {local}" + (
            f" (found {[os.path.basename(b) for b in bins]}: dcam never unpickles; convert once with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'pytorch_model.safetensors'))" if bins else ""))
    tensors, unknown = {}, []
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if re.match(REFERENCE_RULES[0][0], k):
                    tensors[re.sub(*REFERENCE_RULES[0], k)] = sf.get_tensor(k)
                elif k == "quantize.power_vals":
                    _check_bit_order(sf.get_tensor(k), local)
                elif not any(re.match(p, k) for p in SKIPPED):
                    unknown.append(k)
    if unknown or not tensors:
        raise CheckpointError(f"{local} is not a MAGVIT-v2 checkpoint: no encoder.* tensors" if not tensors else
                              f"{len(unknown)} tensor(s) in {local} are not MAGVIT-v2's, e.g. {unknown[:5]}")
    try:
        model = Magvit2Encoder(Magvit2Config.from_shapes({k: tuple(v.shape) for k, v in tensors.items()}))
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"MAGVIT-v2 checkpoint {local}: {type(e).__name__}: {str(e)[:400]}") from None
    return model.eval().to(device)


def _check_bit_order(power_vals: torch.Tensor, local: str) -> None:
    from dcam.actors.models.loading import CheckpointError

    C = power_vals.numel()
    if not torch.equal(power_vals.long().cpu(), 2 ** torch.arange(C - 1, -1, -1)):
        raise CheckpointError(f"MAGVIT-v2 checkpoint {local}: quantize.power_vals is not the most-significant-first "
                              f"bit order dcam implements: {power_vals.tolist()[:4]}...")
