"""`dcam bench-scale`: capacity planning BY SIMULATION on a local multi-node Ray cluster.

The real job (dcam synth shards, read + decode, refine + score, Parquet sink, compaction,
manifest, summary) runs with a stand-in probe (benchmarks/standin_probe.py) that holds each
batch for `gpu_s_per_image` per image and emits maps in the ProbeActor's payload format. Several
raylets run on this machine (ray.cluster_utils.Cluster): a head with 0 CPUs (the driver, as on
KubeRay) and `nodes` workers, each with `node_cpus` logical CPUs (together: this machine's cores)
and `node_gpus` logical GPUs, so 16 stand-in actors fit (they sleep: no real CPU needed).

Per actor count it reports pipeline efficiency = steady images/s / (actors / gpu_s_per_image);
CPU seconds per image of each CPU stage (time.process_time inside the stages: decode, refine +
score, write) and of the whole Ray cluster (every process of it, sampled with psutil: adds Ray's
own scheduling, serialisation and object-store work); and the CPU cores a GPU actor needs at a
given per-image GPU time: CPU s per image / GPU s per image. Where the CPU stages cannot keep up,
the bottleneck is named with the numbers.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import List

from dcam.pipeline.config import load_config
from dcam.pipeline.config_schema import key
from dcam.pipeline.console import emit, log

SIMULATION_NOTE = ("capacity planning BY SIMULATION: the real job (shards, decode, refine, score, Parquet sink, "
                   "manifest) with a stand-in probe that sleeps gpu_s_per_image per image instead of running a model")


@dataclass
class BenchScaleConfig:
    """conf/bench_scale.yaml."""
    actors: List[int] = key()
    images_per_actor: int = key(ge=1)
    gpu_s_per_image: float = key(gt=0)
    grid: int = key(ge=1)
    words: int = key(ge=1)
    batch_size: int = key(ge=1)
    shard_size: int = key(ge=1)
    image_size: int = key(ge=8)
    seed: int = key()
    nodes: int = key(ge=1)
    node_cpus: int = key(ge=1)
    node_gpus: int = key(ge=1)
    object_store_mb: int = key(ge=64)
    plan_gpu_s_per_image: List[float] = key()
    run_overrides: List[str] = key()

    @staticmethod
    def cross_check(cfg) -> str | None:
        if not cfg.actors or min(cfg.actors) < 1:
            return "actors: a non-empty list of pool sizes >= 1"
        if max(cfg.actors) > cfg.nodes * cfg.node_gpus:
            return f"actors: {max(cfg.actors)} stand-in actors need nodes x node_gpus >= that many logical GPUs"
        return None


class ClusterCpu:
    """CPU seconds of every process of the local Ray cluster (this driver and its descendants),
    sampled in the background so processes that exit between samples (actors at the end of an
    execution) are counted up to their last sample (at most `period` s lost per process)."""

    def __init__(self, period: float = 0.5):
        import psutil

        self._psutil, self.period = psutil, period
        self._last: dict[tuple[int, float], float] = {}
        self.timeline: list[tuple[float, float]] = []  # (wall-clock time, CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        me = self._psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self._last[(p.pid, p.create_time())] = t.user + t.system
            except self._psutil.Error:
                continue
        total = sum(self._last.values())
        self.timeline.append((time.time(), total))
        return total

    def at(self, t: float) -> float:
        """CPU seconds so far at wall-clock time t (linear between samples)."""
        import numpy as np

        times, cpu = zip(*self.timeline)
        return float(np.interp(t, times, cpu))

    def _loop(self):
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_cluster(c: dict, temp_dir: str):
    """Head (0 CPUs: the driver only) + `nodes` worker raylets on this machine; ray.init to it."""
    import ray
    from ray.cluster_utils import Cluster

    store = int(c["object_store_mb"]) * 1024 * 1024
    # Ray writes the address of "the current cluster" to <RAY_TMPDIR>/ray/ray_current_cluster: keep
    # it (and every node's session files) in our own dir, never in the machine-wide /tmp/ray.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(f"{temp_dir}/ray", exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, object_store_memory=store,
                                                                include_dashboard=False))
    for _ in range(int(c["nodes"])):
        cluster.add_node(num_cpus=int(c["node_cpus"]), num_gpus=int(c["node_gpus"]), object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    return cluster


def corpus_for(c: dict, root: str, images: int) -> str:
    """A dcam synth corpus of `images` scenes: the first shards of one shared corpus (copied)."""
    from dcam.actors import scenes
    from dcam.pipeline.synth import write_corpus

    full = f"{root}/corpus"
    if not os.path.isdir(full):
        most = max(c["actors"]) * int(c["images_per_actor"])
        write_corpus(full, most, int(c["seed"]), int(c["shard_size"]), scenes.SceneConfig(size=int(c["image_size"])))
    out = f"{root}/input-{images}"
    os.makedirs(out, exist_ok=True)
    for k in range(-(-images // int(c["shard_size"]))):
        shutil.copy(f"{full}/shard-{k:05d}.parquet", out)
    return out


def run_point(c: dict, root: str, actors: int, log) -> dict:
    """One job execution with `actors` stand-in actors; its throughput and CPU per image."""
    from dcam.benchmarks.standin_probe import StandInProbe, read_probe_events, steady_window
    from dcam.pipeline.config import to_dict
    from dcam.pipeline.job import run_job

    images = actors * int(c["images_per_actor"])
    images -= images % int(c["shard_size"]) or 0
    images = max(images, int(c["shard_size"]))
    cfg = load_config("run", [f"input={corpus_for(c, root, images)}", f"output={root}/run-{actors}",
                              "report.enabled=false", f"actors.pool_min={actors}", f"actors.pool_max={actors}",
                              "actors.num_gpus=1", "actors.num_cpus=0", f"probe.batch_size={c['batch_size']}",
                              "ray.progress_bars=false", *c["run_overrides"]])
    events_dir = f"{root}/events-{actors}"
    os.makedirs(events_dir)
    stand_in = (StandInProbe, dict(methods=to_dict(cfg)["methods"], gpu_s_per_image=float(c["gpu_s_per_image"]),
                                   grid=int(c["grid"]), words=int(c["words"]), events_dir=events_dir))
    with ClusterCpu() as cpu:
        s = run_job(cfg, log=lambda m: None, probe_stage=stand_in)
        cpu.sample()
    t = s["timing"]
    t_lo, t_hi, n_steady = steady_window(read_probe_events(events_dir))
    if t_hi <= t_lo or not n_steady:
        raise ValueError(f"{images} images in batches of {c['batch_size']} leave no steady window: raise "
                         "images_per_actor")
    rate = n_steady / (t_hi - t_lo)
    ideal = actors / float(c["gpu_s_per_image"])
    cluster_cpu = (cpu.at(t_hi) - cpu.at(t_lo)) / n_steady
    point = dict(actors=actors, images=images, startup_s=t["startup_s"], total_s=t["total_s"],
                 steady_images_per_s=rate, ideal_images_per_s=ideal, efficiency=rate / ideal,
                 steady_window_s=t_hi - t_lo, steady_images=n_steady, cpu_s_per_image=t["cpu_s_per_image"],
                 cluster_cpu_s_per_image=cluster_cpu, cluster_cores_used=cluster_cpu * rate)
    log(f"{actors:>3} actors, {images} images: steady {rate:.1f} images/s (ideal {ideal:.1f}; efficiency "
        f"{point['efficiency']:.2f}; cluster used {cluster_cpu * rate:.2f} cores), start-up {t['startup_s']:.1f} s, total {t['total_s']:.1f} s; CPU ms/image "
        + ", ".join(f"{k} {v * 1000:.1f}" for k, v in t["cpu_s_per_image"].items())
        + f"; whole cluster {point['cluster_cpu_s_per_image'] * 1000:.1f}")
    return point


def plan(points: list[dict], c: dict) -> dict:
    """CPU cores per GPU actor at each planned GPU time, from the largest run's CPU per image."""
    ref = max(points, key=lambda p: p["images"])
    stages = sum(ref["cpu_s_per_image"].values())
    return dict(stage_cpu_s_per_image=stages, cluster_cpu_s_per_image=ref["cluster_cpu_s_per_image"],
                cores_per_gpu_actor={str(g): dict(stages=stages / g, with_ray_overhead=ref["cluster_cpu_s_per_image"] / g)
                                     for g in c["plan_gpu_s_per_image"]})


def bottleneck(points: list[dict], c: dict, cores: int) -> list[str]:
    """Per actor count that misses 0.9 efficiency: what limits it, with the numbers."""
    out = []
    for p in points:
        if p["efficiency"] >= 0.9:
            continue
        cpu_cap = cores / p["cluster_cpu_s_per_image"] if p["cluster_cpu_s_per_image"] else float("inf")
        stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in p["cpu_s_per_image"].items())
        if cpu_cap < p["ideal_images_per_s"]:
            out.append(f"{p['actors']} actors: CPU-bound. The actors could take {p['ideal_images_per_s']:.0f} images/s; "
                       f"the cluster spends {p['cluster_cpu_s_per_image'] * 1000:.1f} ms CPU per image (stages: "
                       f"{stages}; the rest is Ray's own work), so {cores} cores give at most {cpu_cap:.0f} images/s; "
                       f"measured {p['steady_images_per_s']:.0f} with {p['cluster_cores_used']:.2f} cores used by the "
                       "cluster (the machine is shared: see load_average_1m)")
        else:
            out.append(f"{p['actors']} actors: efficiency {p['efficiency']:.2f} with CPU to spare by this estimate "
                       f"({cpu_cap:.0f} images/s of CPU capacity): scheduling/start-up limited at {p['images']} images")
    return out


def run_bench_scale(cfg, log=print) -> dict:
    import ray

    from dcam.pipeline.config import to_dict

    c = to_dict(cfg)
    root = tempfile.mkdtemp(prefix="dcam-scale-")
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    log(SIMULATION_NOTE)
    load_before = os.getloadavg()[0]
    cluster = start_cluster(c, temp)
    try:
        points = [run_point(c, root, int(n), log) for n in c["actors"]]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return dict(simulation=SIMULATION_NOTE, gpu_s_per_image=float(c["gpu_s_per_image"]), grid=int(c["grid"]),
                words=int(c["words"]), batch_size=int(c["batch_size"]), image_size=int(c["image_size"]),
                machine_cores=cores, load_average_1m=dict(before=load_before, after=os.getloadavg()[0]), cluster=dict(nodes=int(c["nodes"]), node_cpus=int(c["node_cpus"]),
                                                  node_gpus=int(c["node_gpus"])),
                points=points, plan=plan(points, c), bottleneck=bottleneck(points, c, cores))


def command(args) -> int:
    """`dcam bench-scale [--json] [k=v ...]`."""
    cfg = load_config("bench_scale", args.overrides, schema=BenchScaleConfig)
    emit(run_bench_scale(cfg, log=log), args.json)
    return 0
