#!/usr/bin/env python
"""The GPU check of dcam's probe, ready to run on one GPU without Ray and without network.

    python scripts/gpu_check.py > gpu_check.json             # cuda, realistic widths, bf16 (<= 8 min on one H100)
    python scripts/gpu_check.py --tiny --device cpu          # the CI smoke configuration (< 60 s on 2 CPU cores)
    python scripts/gpu_check.py --backends lavida --n 32     # one backend, more images

Wheels it needs (nothing else; no Ray, no pyarrow, no downloads): torch, transformers (>= 5, with
DiffusionGemma), tokenizers and safetensors (transformers' own dependencies), numpy, pillow, scipy.
Run it from a dcam checkout (it imports dcam from the folder above this script) or with dcam
installed.

For every backend in BACKENDS (DiffusionGemma, LaViDa, LLaDA-V, MMaDA; a new backend is one entry: a
builder returning a dcam backend with random weights) it builds a random-weight model at a
realistic width with a few layers, then measures the default Diffusion-CAM probe on given
responses (so every model explains the same words):

- batched (batch 16) vs batch-1 probe images/s, and seconds per image of each probe phase
  (response, attribution, faithfulness) on each side;
- bf16 vs fp32 maps on the same weights and images: Pearson correlation of each map pair (mean
  and minimum) and the share of maps whose argmax cell agrees;
- peak GPU memory of the bf16 model's probing (null on CPU).

Output: one JSON object on stdout (progress on stderr). Keys:
    device, device_name, torch, transformers, tiny, n_images, batch_size, dtype (of the timed runs),
    backends: {name: {config (widths, layers, vocab), params_m, build_s,
                      batched: {batch_size, images, images_per_s, s_per_image: {phase: s}},
                      batch1:  {batch_size, images, images_per_s, s_per_image: {phase: s}},
                      batched_over_batch1,
                      bf16_vs_fp32: {maps, corr_mean, corr_min, argmax_agreement},
                      peak_gpu_mem_gb}},
    errors: {name: "ExceptionType: message"}   (a backend that fails does not stop the others)
Exit status 0 when every backend ran, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script from a checkout: dcam lives one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

RESPONSES = ("red cube", "blue ball", "green mat", "a red box")  # short: byte tokenizers, tiny canvases
PROMPT = "describe the image"
LLADA_SPECIAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                     "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
TINY_SPECIAL_IDS = {k: 256 + i for i, k in enumerate(LLADA_SPECIAL_IDS)}  # the same tokens in a 320-id vocabulary
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")


# -- model builders: one entry per backend --------------------------------------------------------
def seeded_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic random weights: norms' weights 1, biases 0, everything else N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("weight")):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def build_diffusion_gemma(tiny: bool, device: str, seed: int):
    """DiffusionGemma (transformers' native class) with random weights; ByteTokenizer."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dcam.actors.models.diffusion_gemma import DiffusionGemmaBackend

    vocab = 320 if tiny else 32768
    width = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, global_head_dim=32, moe_intermediate_size=64) if tiny else \
        dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=256, global_head_dim=512, moe_intermediate_size=2048)
    layers = width["num_hidden_layers"]
    text = dict(vocab_size=vocab, layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"]),
                sliding_window=512, num_experts=2 if tiny else 8, top_k_experts=1 if tiny else 2,
                use_bidirectional_attention="vision", max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, **width)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=4, pooling_kernel_size=2,
                  position_embedding_size=64) if tiny else \
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3, position_embedding_size=10240)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=vocab - 3, eoi_token_id=vocab - 2,
                               image_token_id=vocab - 1, canvas_length=16 if tiny else 64)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    be = DiffusionGemmaBackend(model, device=device, gen_steps=4 if tiny else 16,
                               max_soft_tokens=70 if tiny else 280)
    return be, dict(text_hidden=width["hidden_size"], text_layers=layers, vision_hidden=vision["hidden_size"],
                    vision_layers=vision["num_hidden_layers"], vocab=vocab)


def llada_tokenizer(special_ids: dict[str, int]):
    """Byte-level BPE without merges (byte b = id b) plus LLaDA's special tokens at the given ids
    (their real ids, or a 320-id vocabulary's when tiny) and LLaDA-8B-Instruct's chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    vocab.update(special_ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_ids])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=LLADA_CHAT_TEMPLATE)


def llada_family_config(kind: str, tiny: bool) -> dict:
    """config.json of a LaViDa (OLMo-style) or LLaDA-V (Llama-style) checkpoint: LLaDA-8B's width
    (4096, 32 heads, MLP 12288) with 4 layers, or a tiny one; SigLIP so400m-shaped tower."""
    d, layers, heads, mlp = (64, 2, 4, 128) if tiny else (4096, 4, 32, 12288)
    vocab = 320 if tiny else 126464
    ids = TINY_SPECIAL_IDS if tiny else LLADA_SPECIAL_IDS
    tile = 56 if tiny else 384  # tiny: 4 x 4 patches per tile instead of so400m's 27 x 27
    mm = dict(model_type="llava_llada", vocab_size=vocab, mm_projector_type="mlp2x_gelu",
              mm_hidden_size=32 if tiny else 1152, mm_patch_merge_type="spatial_unpad",
              vision_config={"num_attention_heads": 4 if tiny else 16, "image_size": tile})
    if kind == "lavida":
        return dict(mm, d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp,
                    embedding_size=vocab, block_type="llama", activation_type="silu", layer_norm_type="rms",
                    rms_norm_eps=1e-5, rope=True, rope_theta=500000.0, weight_tying=False, include_bias=False,
                    max_sequence_length=8192, mask_token_id=ids["<|mdm_mask|>"],
                    image_aspect_ratio="anyres", mm_spatial_pool_mode="bilinear",
                    image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                                          [tile, 3 * tile]])
    return dict(mm, hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=layers,
                intermediate_size=mlp, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                tie_word_embeddings=False, hidden_act="silu", image_aspect_ratio="anyres_max_4",
                image_grid_pinpoints="(1x1),...,(2x2)" if tiny else "(1x1),...,(6x6)")


def build_llada_family(kind: str, tiny: bool, device: str, seed: int):
    from transformers import SiglipVisionConfig

    from dcam.actors.models import lavida, llada_v
    from dcam.actors.models.llada_checkpoint import build_empty

    config = llada_family_config(kind, tiny)
    hidden = config["mm_hidden_size"]
    tower = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden if tiny else 4304,
                               num_hidden_layers=1 if tiny else 4, num_attention_heads=config["vision_config"][
                                   "num_attention_heads"], image_size=config["vision_config"]["image_size"],
                               patch_size=14, layer_norm_eps=1e-6)
    module = lavida if kind == "lavida" else llada_v
    model = seeded_init(build_empty(module._build_from_config, config, tower, torch.float32), seed)
    cls = lavida.LavidaBackend if kind == "lavida" else llada_v.LladaVBackend
    tok = llada_tokenizer(TINY_SPECIAL_IDS if tiny else LLADA_SPECIAL_IDS)
    be = cls(model, tok, model_id=f"{kind}-random", device=device, response_len=16 if tiny else 64)
    d = config.get("d_model") or config["hidden_size"]
    layers = config.get("n_layers") or config["num_hidden_layers"]
    return be, dict(text_hidden=d, text_layers=layers, vision_hidden=hidden, vision_layers=tower.num_hidden_layers,
                    vocab=config["vocab_size"])


MMADA_TASK_IDS = {"<|soi|>": 126084, "<|eoi|>": 126085, "<|mmu|>": 126089}  # MMaDA's reserved task tokens
TINY_MMADA_TASK_IDS = {"<|soi|>": 262, "<|eoi|>": 263, "<|mmu|>": 264}


def build_mmada(tiny: bool, device: str, seed: int):
    """MMaDA: the LLaDA backbone at LLaDA-8B's width with 4 layers (or tiny) over MAGVIT-v2 codes
    (the released encoder's architecture, 512 px -> 32 x 32 codes; tiny: 128 px -> 8 x 8). The
    tokenizer holds LLaDA's special and MMaDA's task tokens (not the 126k-entry vocabulary), so
    image code c is token len(tokenizer) + c, as the reference computes it."""
    from dcam.actors.models import magvit2, mmada
    from dcam.actors.models.llada_checkpoint import build_empty
    from dcam.actors.models.llada_lm import LladaLM, LladaLMConfig

    text_ids, task = (TINY_SPECIAL_IDS, TINY_MMADA_TASK_IDS) if tiny else (LLADA_SPECIAL_IDS, MMADA_TASK_IDS)
    tok = llada_tokenizer({**text_ids, **task})
    d, layers, heads, mlp = (64, 2, 4, 128) if tiny else (4096, 4, 32, 12288)
    vocab = len(tok) + 8192 if tiny else 134656
    config = dict(d_model=d, n_heads=heads, n_kv_heads=heads, n_layers=layers, mlp_hidden_size=mlp, vocab_size=vocab,
                  embedding_size=vocab, block_type="llama", activation_type="silu", layer_norm_type="rms",
                  rms_norm_eps=1e-5, rope=True, rope_theta=500000.0, weight_tying=False, include_bias=False,
                  max_sequence_length=4096, mask_token_id=text_ids["<|mdm_mask|>"])
    lm = build_empty(lambda c, _tower, dt: LladaLM(LladaLMConfig.from_olmo(c), dt), config, None, torch.float32)
    vq_cfg = magvit2.Magvit2Config(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=(1,) * 4) if tiny \
        else magvit2.Magvit2Config()
    model = mmada.MmadaModel(seeded_init(lm, seed), seeded_init(magvit2.Magvit2Encoder(vq_cfg), seed + 1))
    be = mmada.MmadaBackend(model, tok, model_id="mmada-random", device=device, response_len=16 if tiny else 64,
                            gen_steps=16 if tiny else 64, block_length=None, resolution=64 if tiny else 512,
                            task_ids={k.strip("<|>"): v for k, v in task.items()})
    return be, dict(text_hidden=d, text_layers=layers, vq_ch=vq_cfg.ch, vq_levels=len(vq_cfg.ch_mult), vocab=vocab)


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model in the timed dtype; MMaDA's MAGVIT-v2 encoder stays float32, as dcam loads it."""
    if hasattr(model, "vq") and hasattr(model, "lm"):
        model.lm.to(dtype)
        return model
    return model.to(dtype)


BACKENDS = {
    "diffusion_gemma": build_diffusion_gemma,
    "lavida": lambda tiny, device, seed: build_llada_family("lavida", tiny, device, seed),
    "llada_v": lambda tiny, device, seed: build_llada_family("llada_v", tiny, device, seed),
    "mmada": build_mmada,
}


# -- measurements ---------------------------------------------------------------------------------
def images_for(n: int, tiny: bool, seed: int = 0) -> list[np.ndarray]:
    """n random RGB images (uint8), of several shapes so the anyres paths see different layouts."""
    rng = np.random.default_rng(seed)
    shapes = ((48, 64), (64, 48)) if tiny else ((384, 512), (512, 384), (448, 448), (336, 600))
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


def methods_for(backend, faithfulness_steps: int) -> dict:
    from dcam.actors.methods import probe_config

    return {"diffusion_cam": probe_config("diffusion_cam", backend, {"faithfulness_steps": faithfulness_steps})}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def probe_rate(backend, images, methods, batch_size: int, device: str) -> tuple[dict, list]:
    """images/s and seconds per image per phase over `images` in batches of `batch_size`; the maps."""
    from dcam.actors.probe.explain import explain_batch

    phases: dict[str, float] = {}
    results = []
    sync(device)
    t0 = time.perf_counter()
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size]
        responses = [RESPONSES[(lo + i) % len(RESPONSES)] for i in range(len(chunk))]
        results += explain_batch(backend, chunk, [PROMPT] * len(chunk), methods, responses, timings=phases)
        sync(device)
    seconds = time.perf_counter() - t0
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} samples failed, first: {failed[0]}")
    return dict(batch_size=batch_size, images=len(images), images_per_s=len(images) / seconds,
                s_per_image={k: v / len(images) for k, v in phases.items()}), results


def raw_maps(results) -> list[np.ndarray]:
    return [np.asarray(m.raw_map, dtype=np.float64) for r in results for m in r.maps["diffusion_cam"]]


def map_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """Pearson correlation of each map pair and argmax agreement (same words: given responses)."""
    if len(a) != len(b) or not a:
        raise RuntimeError(f"bf16 and fp32 runs explained {len(a)} vs {len(b)} words")
    corr, same = [], 0
    for x, y in zip(a, b):
        x, y = x.ravel(), y.ravel()
        c = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else float(np.allclose(x, y))
        corr.append(float(c))
        same += int(np.argmax(x) == np.argmax(y))
    return dict(maps=len(a), corr_mean=float(np.mean(corr)), corr_min=float(np.min(corr)),
                argmax_agreement=same / len(a))


def check_backend(name: str, args) -> dict:
    """Build (fp32), probe a few images in fp32, convert to bf16, time batched vs batch-1, compare maps."""
    import copy

    t0 = time.perf_counter()
    be32, config = BACKENDS[name](args.tiny, args.device, args.seed)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in be32.model.parameters()) / 1e6
    methods = methods_for(be32, args.faithfulness_steps)
    agree_images = images_for(args.agree_n, args.tiny, seed=1)
    _, res32 = probe_rate(be32, agree_images, methods, args.batch_size, args.device)
    be = copy.copy(be32)  # same backend settings; the model converted in place to the timed dtype
    be.model = to_dtype(be32.model, args.dtype)
    del be32
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _, res16 = probe_rate(be, agree_images, methods, args.batch_size, args.device)
    images = images_for(args.n, args.tiny)
    if not args.tiny:
        probe_rate(be, images[:2], methods, 2, args.device)  # warm-up (kernels, allocator)
    batched, _ = probe_rate(be, images, methods, args.batch_size, args.device)
    single, _ = probe_rate(be, images[:args.single_n], methods, 1, args.device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return dict(config=config, params_m=params, build_s=build_s, batched=batched, batch1=single,
                batched_over_batch1=batched["images_per_s"] / single["images_per_s"],
                bf16_vs_fp32=map_agreement(raw_maps(res16), raw_maps(res32)), peak_gpu_mem_gb=peak)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny widths and few images (the CPU smoke test)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {list(BACKENDS)}")
    p.add_argument("--n", type=int, default=None, help="images of the batched run (default 64; tiny 2)")
    p.add_argument("--single-n", dest="single_n", type=int, default=None, help="images of the batch-1 run")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="default 16; tiny 2")
    p.add_argument("--faithfulness-steps", dest="faithfulness_steps", type=int, default=None,
                   help="deletion/insertion curve resolution (default 8 as dcam run; tiny 1)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.n = a.n or (2 if a.tiny else 64)
    a.single_n = a.single_n or (1 if a.tiny else 16)
    a.batch_size = a.batch_size or (2 if a.tiny else 16)
    a.faithfulness_steps = a.faithfulness_steps if a.faithfulness_steps is not None else (1 if a.tiny else 8)
    a.agree_n = 1 if a.tiny else 8
    if a.tiny:
        torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared CPU
    a.dtype = torch.bfloat16
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    out = dict(device=args.device, device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else
               "cpu", torch=torch.__version__, transformers=transformers.__version__, tiny=args.tiny, n_images=args.n,
               batch_size=args.batch_size, dtype="bfloat16", backends={}, errors={})
    for name in [b for b in args.backends.split(",") if b]:
        t0 = time.perf_counter()
        try:
            out["backends"][name] = check_backend(name, args)
        except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit status; the others still run
            traceback.print_exc(file=sys.stderr)
            out["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(out, default=float))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
