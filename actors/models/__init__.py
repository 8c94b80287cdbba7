"""Model backends. `load_backend(model_cfg)` builds the backend a config names."""
from __future__ import annotations

import torch


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "float32": torch.float32, "fp32": torch.float32}[dtype]


# model_types each native backend implements: their checkpoints' config.json may carry an auto_map
# (pointing at the authors' modeling code), which dcam never imports (see loading.check_remote_code)
NATIVE_MODEL_TYPES = {"lavida": ("llava_llada",), "llada_v": ("llava_llada",), "mmada": ("mmada",)}
BACKENDS = ("tiny", "diffusion_gemma", "lavida", "llada_v", "mmada")


def native_model_types(backend: str | None) -> tuple[str, ...]:
    return NATIVE_MODEL_TYPES.get(backend or "tiny", ())


def load_backend(model_cfg: dict):
    """Backend for a `model` config node (see conf/model/*.yaml)."""
    kind = model_cfg.get("backend", "tiny")
    device = resolve_device(model_cfg.get("device"))
    if kind == "tiny":
        from dcam.actors.models.tiny_backend import TinyBackend

        backend = TinyBackend.load(model_cfg.get("source"), device=device, gen_steps=model_cfg.get("gen_steps"),
                                   block_length=model_cfg.get("block_length"),
                                   temperature=float(model_cfg.get("temperature") or 0.0),
                                   model_id=model_cfg.get("model_id") or "dcam-tiny",
                                   trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                                   storage_options=model_cfg.get("storage_options"),
                                   cache_dir=model_cfg.get("cache_dir"))
        dtype = resolve_dtype(model_cfg.get("dtype"), device)
        backend.model.to(dtype)
        return backend
    if kind == "diffusion_gemma":
        from dcam.actors.models.diffusion_gemma import DiffusionGemmaBackend

        return DiffusionGemmaBackend.load(model_cfg, device=device, dtype=resolve_dtype(model_cfg.get("dtype"), device))
    if kind == "lavida":
        from dcam.actors.models.lavida import LavidaBackend

        return LavidaBackend.load(model_cfg, device=device, dtype=resolve_dtype(model_cfg.get("dtype"), device))
    if kind == "llada_v":
        from dcam.actors.models.llada_v import LladaVBackend

        return LladaVBackend.load(model_cfg, device=device, dtype=resolve_dtype(model_cfg.get("dtype"), device))
    if kind == "mmada":
        from dcam.actors.models.mmada import MmadaBackend

        return MmadaBackend.load(model_cfg, device=device, dtype=resolve_dtype(model_cfg.get("dtype"), device))
    raise ValueError(f"unknown model backend {kind!r} (known: {', '.join(BACKENDS)})")
