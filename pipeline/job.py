"""The audit job: shards -> read + decode + validate (CPU tasks) -> ProbeActor (one
model replica per actor, GPU when configured) -> refine + score + write (CPU tasks) -> Parquet.

One streaming execution over every pending shard (an execution builds an actor pool and loads
the model once). The driver only sees tiny per-batch summaries: it reports progress and compacts
each shard as soon as all its rows are written. Resume and exactly-once: pipeline/manifest.py.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dcam.pipeline import stages
from dcam.pipeline.config import config_hash, to_dict
from dcam.pipeline.manifest import SUCCESS, RunDir, compact, load_or_create_manifest, parts_of, reconcile
from dcam.pipeline.sources import list_shards


class JobIncompleteError(RuntimeError):
    """Shards are still pending after the execution (their rows were not all written)."""


class DriverInterrupted(RuntimeError):
    """Raised by the test-only `testing.stop_after_rows` switch to simulate losing the driver."""


# -- driver --------------------------------------------------------------------------------------
class ClusterResourceError(RuntimeError):
    """No node of a cluster that cannot grow can ever host one ProbeActor: the job would hang."""


def ensure_ray(d: dict) -> bool:
    """Connect to RAY_ADDRESS / ray.address when given (ray job submit), else start a local
    cluster with explicit resources. An already initialised Ray (tests, an application that
    embeds the job) is reused. Returns True when the cluster may grow (an existing cluster,
    possibly autoscaled), False when it cannot (a local cluster this process started)."""
    import ray

    if ray.is_initialized():
        return not started_local_ray()
    r = d["ray"]
    address = r.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
        return True
    kwargs = dict(include_dashboard=False, logging_level="ERROR", object_store_memory=r.get("object_store_memory"))
    if r.get("temp_dir"):
        kwargs["_temp_dir"] = str(r["temp_dir"])
    for k in ("num_cpus", "num_gpus"):
        if r.get(k) is not None:
            kwargs[k] = r[k]
    ray.init(**kwargs)
    return False


def started_local_ray() -> bool:
    """Whether the initialised Ray is a local cluster this process started (ray.init() without
    an address: the driver's node is the head). Ray has no public API for it; the driver's Node
    object records it (head=True when started, False when connected). Unknown -> False, i.e.
    assume a cluster that may grow: warn rather than refuse an autoscaling cluster's job."""
    import ray._private.worker as ray_worker

    return bool(getattr(getattr(ray_worker, "_global_node", None), "head", False))


def check_actor_resources(actors_cfg: dict, may_grow: bool, log) -> None:
    """Ray Data waits forever for an actor no node can host (it only logs a warning). On a
    cluster that cannot grow that is a certain hang, so fail now and say what is missing; on an
    existing cluster an autoscaler may add the node, so say loudly what the job is waiting for."""
    import ray

    need = {"CPU": float(actors_cfg.get("num_cpus") or 0), "GPU": float(actors_cfg.get("num_gpus") or 0)}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in need.items()) for res in nodes):
        return
    have = [{k: res.get(k, 0.0) for k in need} for res in nodes]
    msg = (f"no Ray node can host one ProbeActor: it needs {need} (actors.num_cpus, actors.num_gpus) and the "
           f"nodes have {have}")
    if not may_grow:
        most_gpus = max((h["GPU"] for h in have), default=0.0)
        gpu_hint = "set actors.num_gpus=0 to probe on CPU, or " if need["GPU"] > most_gpus else ""
        raise ClusterResourceError(f"{msg}: {gpu_hint}give the local cluster more (ray.num_cpus, ray.num_gpus), "
                                   "or lower the actor's request.")
    log(f"WARNING: {msg}; waiting for the cluster to scale up (Ray Data waits without a deadline)")


def probe_threads(d: dict, may_grow: bool) -> int | None:
    """torch threads per ProbeActor. Ray pins a worker with fractional num_cpus to one OpenMP
    thread, which leaves most of a CPU-only machine idle while the probe (the only heavy stage)
    runs; `auto` gives each actor of a local cluster an equal share of this machine's cores. On an
    existing cluster `auto` keeps Ray's setting (node sizes are unknown here): set a number."""
    t = d["probe"].get("threads")
    if t != "auto":
        return None if t is None else int(t)
    if may_grow:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(d["actors"].get("pool_max") or 1)))


def build_dataset(pending, run: RunDir, d: dict, cfg_hash: str):
    import ray
    from ray.data import ActorPoolStrategy

    from dcam.actors.probe_actor import ProbeActor

    so = d.get("storage") or {}
    bs = int(d["probe"]["batch_size"])
    items = [dict(url=e.url, format=e.format, shard_key=e.shard_key, rows=e.rows) for e in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(stages.read_decoded_rows, fn_kwargs=dict(cfg=d), num_cpus=d["decode_num_cpus"])
    a = d["actors"]
    ds = ds.map_batches(ProbeActor, batch_size=bs, batch_format="numpy",
                        fn_constructor_kwargs=dict(model_cfg=d["model"], methods=d["methods"], probe_cfg=d["probe"],
                                                   testing=d.get("testing") or {}),
                        compute=ActorPoolStrategy(min_size=int(a["pool_min"]), max_size=int(a["pool_max"])),
                        num_gpus=a["num_gpus"], num_cpus=a["num_cpus"])
    ds = ds.map_batches(stages.refine_score_batch, batch_size=bs, batch_format="numpy", num_cpus=d["score_num_cpus"],
                        fn_kwargs=dict(methods=d["methods"], sink_cfg=d["sink"], cfg_hash=cfg_hash))
    return ds.map_batches(stages.write_batch, batch_size=None, batch_format="numpy", num_cpus=d["score_num_cpus"],
                          fn_kwargs=dict(run_url=run.url, cfg_hash=cfg_hash, storage_options=so,
                                         shard_keys={e.url: e.shard_key for e in pending}))


def execute(pending, run: RunDir, d: dict, cfg_hash: str, log) -> dict:
    """Run the streaming execution; compact shards as they complete. Returns counts."""
    import ray

    t_start = time.perf_counter()
    may_grow = ensure_ray(d)
    check_actor_resources(d["actors"], may_grow, log)
    d = {**d, "probe": {**d["probe"], "threads": probe_threads(d, may_grow)}}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(d["ray"].get("progress_bars", True))
    expected = {e.url: e.rows for e in pending}
    entries = {e.url: e for e in pending}
    seen = {u: 0 for u in expected}
    counts = dict(inputs=0, ok=0, errors={})
    total = sum(expected.values())
    t0, last = time.perf_counter(), 0.0
    first = None  # (time, rows) when the first output batch arrived: start-up ends there
    with ThreadPoolExecutor(4) as pool:
        futures = []
        for batch in build_dataset(pending, run, d, cfg_hash).iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = (time.perf_counter(), int(np.sum(batch["inputs"])))
            for shard, n, ok, errs in zip(batch["shard"], batch["inputs"], batch["ok"], batch["errors"]):
                seen[shard] += int(n)
                counts["inputs"] += int(n)
                counts["ok"] += int(ok)
                for k in filter(None, str(errs).split(",")):
                    counts["errors"][k] = counts["errors"].get(k, 0) + 1
                if seen[shard] >= expected[shard]:  # every row written: compact now
                    e = entries[shard]
                    futures.append(pool.submit(lambda e=e: compact(run, e, cfg_hash, parts_of(run, e, cfg_hash))))
            stop_after = (d.get("testing") or {}).get("stop_after_rows")
            if stop_after is not None and counts["inputs"] >= int(stop_after):
                raise DriverInterrupted(f"testing.stop_after_rows={stop_after}: simulated driver loss")
            now = time.perf_counter() - t0
            if now - last > 10 or counts["inputs"] == total:
                last = now
                log(f"{counts['inputs']}/{total} rows ({counts['ok']} ok), {counts['inputs'] / max(now, 1e-9):.1f} rows/s")
        for f in futures:
            f.result()
    end = time.perf_counter()
    counts["seconds"] = end - t0
    if first is not None:
        steady_rows, steady_s = counts["inputs"] - first[1], end - first[0]
        counts["timing"] = dict(startup_s=first[0] - t_start, total_s=end - t_start,
                                steady_rows_per_s=steady_rows / steady_s if steady_s > 0 and steady_rows else None)
    return counts


def run_job(cfg, log=print) -> dict:
    from dcam.pipeline.report.summary import finish_run

    d = to_dict(cfg)
    h = config_hash(cfg)
    so = d.get("storage") or {}

    source = d["model"].get("source")
    if source is None and d["model"].get("backend", "tiny") == "tiny":
        from dcam.actors.models.tiny_backend import SHIPPED_WEIGHTS

        source = SHIPPED_WEIGHTS  # fail here, not inside every actor, if the package lacks its weights
    if d["model"].get("source") and "://" in str(d["model"]["source"]) and not d["model"].get("storage_options"):
        from dcam.pipeline.storage import fsspec_kwargs, scheme_of

        src = str(d["model"]["source"])  # a remote checkpoint uses the run's storage settings unless it has its own
        d["model"]["storage_options"] = fsspec_kwargs(scheme_of(src), so)
    from dcam.actors.models import native_model_types
    from dcam.actors.models.loading import ALLOWED_SCHEMES, preflight

    preflight(source, bool(d["model"].get("trust_remote_code", False)), d["model"].get("storage_options"),
              allowed_schemes=tuple(so.get("allowed_schemes") or ALLOWED_SCHEMES),
              native_model_types=native_model_types(d["model"].get("backend")))
    run = RunDir(d["output"], so)
    input_url = d["input"] or synthesise_default(run, d, log)
    shards = list_shards(input_url, d["format"], so)
    entries = load_or_create_manifest(run, h, input_url, shards, d["source"], log)
    complete, pending = reconcile(run, entries, h, log)
    log(f"run {run.url} (config {h}): {len(entries)} shards, {len(complete)} already complete, {len(pending)} to process")
    counts = execute(pending, run, d, h, log) if pending else dict(inputs=0, ok=0, errors={}, seconds=0.0)
    complete, still = reconcile(run, entries, h, log)
    if still:
        raise JobIncompleteError(f"{len(still)} shards still incomplete after the run: {[e.url for e in still][:5]}")
    run.write_text(SUCCESS, json.dumps(dict(config_hash=h, shards=len(entries))))
    return finish_run(run, d, h, counts, log)


def synthesise_default(run: RunDir, d: dict, log) -> str:
    """The no-argument run: a fresh held-out corpus written once into <output>/input."""
    from dcam.actors import scenes
    from dcam.pipeline.synth import write_corpus

    s = d["synth"]
    url = f"{run.url.rstrip('/')}/input"
    if not run.exists("input", "_SYNTH_DONE"):  # (re)written whole: generation is byte-deterministic
        log(f"synthesising {s['n']} held-out scenes (seed {s['seed']}) into {url}")
        write_corpus(url, int(s["n"]), int(s["seed"]), int(s["shard_size"]), scenes.SceneConfig(),
                     d.get("storage") or {}, with_response=bool(s.get("with_response", False)))
        run.write_text("input/_SYNTH_DONE", json.dumps(s))
    return url
