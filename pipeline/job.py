"""The audit job: shards -> read + decode + validate (CPU tasks) -> ProbeActor (one
model replica per actor, GPU when configured) -> refine + score + write (CPU tasks) -> Parquet.

One streaming execution over every pending shard (an execution builds an actor pool and loads
the model once). The driver only sees tiny per-batch summaries: it reports progress and compacts
each shard as soon as all its rows are written. Resume and exactly-once: pipeline/manifest.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dcam.pipeline import stages
from dcam.pipeline.compaction import ShardIncompleteError, compact, parts_of
from dcam.pipeline.config import config_hash, to_dict
from dcam.pipeline.console import progress_line
from dcam.pipeline.layout import SUCCESS, RunDir, check_disjoint, synth_input_url
from dcam.pipeline.lease import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, OutputLease
from dcam.pipeline.manifest import load_or_create_manifest, reconcile, refuse_input_inside_run
from dcam.pipeline.run_config import check_run_config, store_run_config
from dcam.pipeline.sinks import CPU_COLUMNS
from dcam.pipeline.sources import list_shards

# Ray Data passes every actor pool's UDF to the actor constructor by object reference and enables
# actor restarts, so Ray's core worker logs one error-level line per pool on every run (ray-project/
# ray#53727). The reference is held by the executing Dataset for the whole run (and its object lives
# on the driver's node), so restarting a ProbeActor that died works: tests kill one and every row is
# still written exactly once. Turning restarts off would silence it and lose that fault tolerance.
RAY_ACTOR_ARGS_NOTE = ("note: Ray logs an error-level line 'Actor ... MapBatches(ProbeActor) ... has constructor "
                       "arguments in the object store and max_restarts > 0' on every run: expected and harmless "
                       "here (README: Ray's log lines)")


class JobIncompleteError(RuntimeError):
    """Shards are still pending after the execution, or final files do not hold exactly the
    manifest's input rows: no _SUCCESS."""


class DriverInterrupted(RuntimeError):
    """Raised by the test-only `testing.stop_after_rows` switch to simulate losing the driver."""


def hold_for_a_kill(futures, hold_after, log) -> None:
    """Test-only (`testing.hold_after_compactions=N`): once N shards are compacted, wait for their
    final files, then block so a test can kill the driver mid-run at a known point (the N final
    files written, every other shard uncompacted, no _SUCCESS) however fast the pipeline is."""
    for f in futures:
        f.result()
    log(f"testing.hold_after_compactions={hold_after}: {len(futures)} final files written; holding until killed")
    while True:
        time.sleep(60)


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


def probe_threads(d: dict, may_grow: bool) -> int | str | None:
    """torch threads per ProbeActor. Ray pins a worker with fractional num_cpus to one OpenMP
    thread, which leaves most of a CPU-only machine idle while the probe (the only heavy stage)
    runs; `auto` gives each actor of a local cluster an equal share of this machine's cores. On an
    existing cluster the driver cannot know the node an actor lands on: "auto" stays, and each
    actor sizes itself there (pipeline.node_threads.actor_node_threads, handed over in
    build_dataset)."""
    t = d["probe"].get("threads")
    if t != "auto":
        return None if t is None else int(t)
    if may_grow:
        return "auto"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(d["actors"].get("pool_max") or 1)))


def build_dataset(pending, run: RunDir, d: dict, cfg_hash: str, probe_stage: tuple | None = None):
    """The dataset graph. `probe_stage` = (callable class, constructor kwargs) replaces the
    ProbeActor (dcam bench-scale's stand-in probe: the rest of the job is the real one)."""
    import ray
    from ray.data import ActorPoolStrategy

    from dcam.actors.probe_actor import ProbeActor
    from dcam.pipeline.node_threads import actor_node_threads

    so = d.get("storage") or {}
    bs = int(d["probe"]["batch_size"])
    items = [dict(url=e.url, format=e.format, shard_key=e.shard_key, rows=e.rows) for e in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(stages.read_decoded_rows, fn_kwargs=dict(cfg=d), num_cpus=d["decode_num_cpus"])
    a = d["actors"]
    probe_cls, probe_kwargs = probe_stage or (ProbeActor, dict(
        model_cfg=d["model"], methods=d["methods"], probe_cfg=d["probe"], testing=d.get("testing") or {},
        threads_resolver=actor_node_threads))
    ds = ds.map_batches(probe_cls, batch_size=bs, batch_format="numpy", fn_constructor_kwargs=probe_kwargs,
                        compute=ActorPoolStrategy(min_size=int(a["pool_min"]), max_size=int(a["pool_max"])),
                        num_gpus=a["num_gpus"], num_cpus=a["num_cpus"])
    ds = ds.map_batches(stages.refine_score_batch, batch_size=bs, batch_format="numpy", num_cpus=d["score_num_cpus"],
                        fn_kwargs=dict(methods=d["methods"], sink_cfg=d["sink"], cfg_hash=cfg_hash))
    return ds.map_batches(stages.write_batch, batch_size=None, batch_format="numpy", num_cpus=d["score_num_cpus"],
                          fn_kwargs=dict(run_url=run.url, cfg_hash=cfg_hash, storage_options=so,
                                         shard_keys={e.url: e.shard_key for e in pending}))


def execute(pending, run: RunDir, d: dict, cfg_hash: str, log, lease: OutputLease,
            probe_stage: tuple | None = None) -> dict:
    """Run the streaming execution; compact shards as they complete. Returns counts. Stops with
    LeaseLostError as soon as the output lease was found taken over."""
    import ray

    t_start = time.perf_counter()
    may_grow = ensure_ray(d)
    check_actor_resources(d["actors"], may_grow, log)
    d = {**d, "probe": {**d["probe"], "threads": probe_threads(d, may_grow)}}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(d["ray"].get("progress_bars", True))
    log(RAY_ACTOR_ARGS_NOTE)
    expected = {e.url: e.rows for e in pending}
    entries = {e.url: e for e in pending}
    seen = {u: 0 for u in expected}
    counts = dict(inputs=0, ok=0, errors={}, cpu_s=dict.fromkeys(CPU_COLUMNS, 0.0))
    total = sum(expected.values())
    t0, last = time.perf_counter(), 0.0
    first = None  # (time, rows) when the first output batch arrived: start-up ends there
    with ThreadPoolExecutor(4) as pool:
        futures = []
        testing = d.get("testing") or {}
        hold_after = testing.get("hold_after_compactions")
        for batch in build_dataset(pending, run, d, cfg_hash, probe_stage).iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = (time.perf_counter(), int(np.sum(batch["inputs"])))
            add_cpu_seconds(counts["cpu_s"], batch)
            for shard, n, ok, errs in zip(batch["shard"], batch["inputs"], batch["ok"], batch["errors"]):
                seen[shard] += int(n)
                counts["inputs"] += int(n)
                counts["ok"] += int(ok)
                for k in filter(None, str(errs).split(",")):
                    counts["errors"][k] = counts["errors"].get(k, 0) + 1
                if seen[shard] >= expected[shard]:  # every row written: compact now
                    if hold_after is not None and len(futures) >= int(hold_after):
                        continue  # test-only: leave this shard's parts uncompacted, hold below
                    futures.append(pool.submit(compact_shard, run, entries[shard], cfg_hash, lease, log))
            lease.check()
            stop_after = testing.get("stop_after_rows")
            if stop_after is not None and counts["inputs"] >= int(stop_after):
                raise DriverInterrupted(f"testing.stop_after_rows={stop_after}: simulated driver loss")
            if hold_after is not None and len(futures) >= int(hold_after):
                hold_for_a_kill(futures, hold_after, log)
            now = time.perf_counter() - t0
            if now - last > 10 or counts["inputs"] == total:
                last = now
                log(progress_line(counts["inputs"], total, counts["ok"], steady_rate(first, counts["inputs"])))
        for f in futures:
            f.result()
    end = time.perf_counter()
    counts["seconds"] = end - t0
    if first is not None:
        steady_rows, steady_s = counts["inputs"] - first[1], end - first[0]
        counts["timing"] = dict(startup_s=first[0] - t_start, total_s=end - t_start,
                                steady_rows_per_s=steady_rows / steady_s if steady_s > 0 and steady_rows else None,
                                cpu_s_per_image={k.removesuffix("_cpu_s"): v / max(1, counts["inputs"])
                                                 for k, v in counts["cpu_s"].items()})
    return counts


def add_cpu_seconds(total: dict, batch: dict) -> None:
    """Add a written batch's per-stage CPU seconds (pipeline.sinks.CPU_COLUMNS) to `total`."""
    for k in total:
        if k in batch:
            total[k] += float(np.sum(batch[k]))


def compact_shard(run: RunDir, entry, cfg_hash: str, lease: OutputLease, log) -> None:
    """Compact a shard whose rows all came back, fenced by the lease. Parts that are not all there
    (deleted under this driver) leave the shard to the final reconcile, which redoes or fails it."""
    try:
        compact(run, entry, cfg_hash, parts_of(run, entry, cfg_hash), fence=lease.fence)
    except ShardIncompleteError as e:
        log(f"WARNING: {e}; left to the final reconciliation")


def steady_rate(first: tuple[float, int] | None, done: int) -> float | None:
    """Input rows/s since the first output batch (start-up excluded: Ray and model load would
    make an early ETA far too long); None until a second batch arrived."""
    if first is None or done <= first[1]:
        return None
    return (done - first[1]) / max(time.perf_counter() - first[0], 1e-9)


def preflight_model(d: dict, so: dict) -> None:
    """Refuse a checkpoint that cannot load (or declares remote code) before anything starts."""
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


def run_job(cfg, log=print, probe_stage: tuple | None = None) -> dict:
    """The whole audit: refuse overlapping input/output, take the output lease, (synthesise,) list,
    reconcile, execute the pending shards, verify the accounting, _SUCCESS, summary and report.
    `probe_stage`: see build_dataset (benchmarks only)."""
    d = to_dict(cfg)
    h = config_hash(cfg)
    so = d.get("storage") or {}
    preflight_model(d, so)
    run = RunDir(d["output"], so)
    input_url = d["input"] or synth_input_url(run.url)
    check_disjoint(input_url, run.url, so)
    check_run_config(run, d, h)  # a changed result-relevant key is refused before any work, naming the keys
    # a given input is listed before the output is touched: a wrong input creates nothing
    shards = list_shards(input_url, d["format"], so) if d["input"] else None
    lc = d.get("lease") or {}
    lease = OutputLease(run, ttl_s=lc.get("ttl_s", DEFAULT_TTL_S), heartbeat_s=lc.get("heartbeat_s", DEFAULT_HEARTBEAT_S),
                        log=log)
    with sigterm_raises_exit(), lease:
        refuse_input_inside_run(run)
        if not d["input"]:
            synthesise_default(input_url, d, log)
            shards = list_shards(input_url, d["format"], so)
        entries = load_or_create_manifest(run, h, input_url, shards, d["source"], log)
        store_run_config(run, d, h)
        rec = reconcile(run, entries, h, log, fence=lease.fence)
        unchanged = not rec.pending and not rec.changed  # a rerun of a finished run: results as summarised
        if rec.pending and run.exists(SUCCESS):
            run.fs.rm(run.path(SUCCESS))  # a final file failed verification: the run is not complete any more
        log(f"run {run.url} (config {h}, lease {lease.run_id}): {len(entries)} shards, {len(rec.complete)} already "
            f"complete, {len(rec.pending)} to process")
        counts = dict(inputs=0, ok=0, errors={})
        if rec.pending:  # else the reconciliation above already verified every final file (under the lease)
            counts = execute(rec.pending, run, d, h, log, lease, probe_stage)
            rec = reconcile(run, entries, h, log, fence=lease.fence)
        if rec.pending or not rec.accounting.exact:
            raise JobIncompleteError(f"{len(rec.pending)} shards still incomplete after the run "
                                     f"({rec.accounting.describe()}): {[e.url for e in rec.pending][:5]}")
        return complete_run(run, d, h, counts, rec.accounting, lease, log, unchanged and not rec.changed)


def complete_run(run: RunDir, d: dict, h: str, counts: dict, accounting, lease: OutputLease, log,
                 unchanged: bool = False) -> dict:
    """Cross-check the results against the accounting, write _SUCCESS (fenced), then summary and report."""
    from dcam.pipeline.report.grounding import DEFAULT_GROUNDING_THRESHOLD
    from dcam.pipeline.report.summary import finish_run, results_summary

    threshold = (d.get("report") or {}).get("grounding_threshold", DEFAULT_GROUNDING_THRESHOLD)
    s = results_summary(run, h, counts, accounting, unchanged, threshold)
    lease.fence("writing _SUCCESS")
    run.write_text(SUCCESS, json.dumps(dict(config_hash=h, shards=len(accounting.expected), lease=lease.run_id,
                                            **{k: accounting.to_dict()[k] for k in ("expected_inputs", "present_inputs")})))
    return finish_run(run, d, s, log)


@contextlib.contextmanager
def sigterm_raises_exit():
    """SIGTERM (pod deletion, `ray job stop`) raises SystemExit, so the lease is released on the
    way out (Ray installs the same handler once ray.init ran). Only the main thread may do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def synthesise_default(url: str, d: dict, log) -> None:
    """The no-argument run: a fresh held-out corpus written once into <output>-input, beside the
    run directory (input and output never overlap)."""
    from dcam.actors import scenes
    from dcam.pipeline.synth import write_corpus

    s = d["synth"]
    corpus = RunDir(url, d.get("storage") or {})
    if not corpus.exists("_SYNTH_DONE"):  # (re)written whole: generation is byte-deterministic
        log(f"synthesising {s['n']} held-out scenes (seed {s['seed']}) into {url}")
        write_corpus(url, int(s["n"]), int(s["seed"]), int(s["shard_size"]), scenes.SceneConfig(),
                     d.get("storage") or {}, with_response=bool(s.get("with_response", False)))
        corpus.write_text("_SYNTH_DONE", json.dumps(s))
