"""`probe.threads=auto` on an existing cluster: torch threads sized from the node an actor lands on.

Ray pins a worker whose actor asked for a fractional `num_cpus` to one OpenMP thread. On a GPU
node that leaves the probe's host-side work (tokenising, pre/post-processing, the CPU parts of
the attribution pass) on one core while the node's other cores idle between the CPU stages'
tasks. The driver cannot size this: on an existing (KubeRay, autoscaled) cluster it does not know
which node an actor will land on. So the ProbeActor calls `actor_node_threads` (handed to it by
pipeline.job: dcam.actors never imports Ray) once in its constructor, on its own node.

The rule (`threads_for_share`): an actor that holds the fraction s of its node's scarcest
resource it asked for (its GPUs, or its CPUs on a CPU-only actor) gets that fraction of the
node's CPUs as torch threads: floor(s x node CPUs), at least ceil(its own CPUs), at least 1.
One GPU of a 4-GPU, 32-CPU node -> 8 threads; 0.5 CPU of a CPU-only 8-CPU node -> 1 (the
actor's share really is 1/16 of the node there, so Ray's setting stands).
"""
from __future__ import annotations

import math

# Resources that say nothing about the actor's share of the node's compute.
NON_COMPUTE_PREFIXES = ("node:", "memory", "object_store_memory", "accelerator_type:")


def threads_for_share(assigned: dict[str, float], node_total: dict[str, float]) -> int:
    """torch threads for an actor holding `assigned` resources on a node with `node_total`."""
    node_cpus = float(node_total.get("CPU", 0.0))
    own_cpus = float(assigned.get("CPU", 0.0))
    shares = [float(v) / float(node_total[k]) for k, v in assigned.items()
              if v and not k.startswith(NON_COMPUTE_PREFIXES) and float(node_total.get(k, 0.0)) > 0]
    share = max(shares, default=0.0)
    return max(1, math.ceil(own_cpus - 1e-9), math.floor(node_cpus * share + 1e-9))


def actor_node_threads() -> int | None:
    """Threads for the calling Ray actor, from its assigned resources and its node's totals.
    None outside a Ray worker or when the node is not found (the caller then keeps Ray's setting)."""
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id and n.get("Alive")), None)
    if node is None:
        return None
    return threads_for_share(ctx.get_assigned_resources(), node.get("Resources", {}))
