"""`dcam bench-probe`: batched probing vs a batch-1 loop on the same scenes, one run.

Both sides run the default Diffusion-CAM probe (generation, attribution pass, faithfulness) on
identical scenes after a warm-up; only the batch size differs. Reported: images/s of each and
their ratio (measured in the same process, so machine noise affects both alike).

The faithfulness curves are measured on the refined maps, as in `dcam run` (the probe refines the
maps that get curves with the method's RefineConfig): `faithfulness_refine` is the part of the
faithfulness seconds spent refining. `faithfulness_sample` < 1 measures curves on that fraction
of the words only (probe.faithfulness_sample; words chosen from the scene id and word position).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from dcam.actors import scenes
from dcam.actors.methods import probe_config, refine_config
from dcam.actors.probe.explain import explain_batch
from dcam.pipeline.config import load_config, to_dict
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log


def _throughput(backend, items, methods, batch_size: int, refines=None) -> tuple[float, dict[str, float]]:
    """images/s and the seconds per image spent in each probe phase."""
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        explain_batch(backend, [s.image for s in chunk], [s.prompt for s in chunk], methods, timings=phases,
                      refines=refines, ids=[f"scene-{lo + k}" for k in range(len(chunk))])
    return len(items) / (time.perf_counter() - t0), {k: v / len(items) for k, v in phases.items()}


def run_bench_probe(cfg: dict, log=print) -> dict:
    """Both sides in one process on the same scenes. Besides the headline ratio: per phase
    (response = generation, attribution, faithfulness) the seconds per image of each side, and
    `ratio_without_faithfulness`, the same two runs with the faithfulness seconds taken out."""
    from dcam.actors.models import load_backend

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    backend = load_backend(cfg["model"] if isinstance(cfg.get("model"), dict) else {"backend": "tiny"})
    overrides = {"faithfulness_steps": int(cfg["faithfulness_steps"]),
                 "faithfulness_sample": float(cfg.get("faithfulness_sample", 1.0))}
    methods = {"diffusion_cam": probe_config("diffusion_cam", backend, overrides)}
    refines = {"diffusion_cam": refine_config("diffusion_cam", backend.eos_id)}
    size = backend.model.config.image_size if hasattr(backend, "model") else 96
    items = scenes.make_scenes(int(cfg["seed"]), 0, int(cfg["n"]), scenes.SceneConfig(size=size))
    _throughput(backend, items[:4], methods, 4, refines)  # warm-up (allocator, kernels)
    batched, b_phase = _throughput(backend, items, methods, int(cfg["batch_size"]), refines)
    log(f"batched (batch {cfg['batch_size']}): {batched:.2f} images/s  {_fmt(b_phase)}")
    single, s_phase = _throughput(backend, items, methods, 1, refines)
    log(f"batch-1 loop: {single:.2f} images/s  {_fmt(s_phase)}")
    faith = (1 / single - s_phase.get("faithfulness", 0.0)) / (1 / batched - b_phase.get("faithfulness", 0.0))
    log(f"ratio {batched / single:.2f}; without the faithfulness seconds {faith:.2f}")
    return dict(n=len(items), batch_size=int(cfg["batch_size"]), batched_ips=batched, single_ips=single,
                ratio=batched / single, ratio_without_faithfulness=faith,
                batched_s_per_image=b_phase, single_s_per_image=s_phase,
                faithfulness_steps=overrides["faithfulness_steps"], faithfulness_sample=overrides["faithfulness_sample"],
                torch_threads=torch.get_num_threads())


def _fmt(phases: dict[str, float]) -> str:
    return "  ".join(f"{k} {v * 1000:.0f} ms/image" for k, v in phases.items())


@dataclass
class BenchProbeConfig:
    """conf/bench_probe.yaml."""
    n: int = key(ge=1)
    seed: int = key()
    batch_size: int = key(ge=1)
    faithfulness_steps: int = key(ge=0)
    faithfulness_sample: float = key(gt=0, le=1)
    threads: int = key(ge=1)
    model: Any = key()


def command(args) -> int:
    """`dcam bench-probe [--json] [k=v ...]`."""
    cfg = to_dict(load_config("bench_probe", args.overrides, schema=BenchProbeConfig))
    emit(run_bench_probe(cfg, log=log), args.json)
    return 0
