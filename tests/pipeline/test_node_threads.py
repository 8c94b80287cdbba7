"""`probe.threads=auto` on an existing cluster: each ProbeActor sizes torch threads from its node."""
from __future__ import annotations

import pytest
import torch

from dcam.actors.probe_actor import ProbeActor, set_probe_threads
from dcam.pipeline.node_threads import threads_for_share


@pytest.mark.parametrize("assigned, node, expected", [
    ({"CPU": 0.5, "GPU": 1.0}, {"CPU": 32.0, "GPU": 4.0}, 8),    # one of 4 GPUs: a quarter of the cores
    ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, 8),     # the node's only GPU: all of its cores
    ({"CPU": 0.5, "GPU": 0.5}, {"CPU": 16.0, "GPU": 1.0}, 8),    # half a GPU: half the cores
    ({"CPU": 0.5}, {"CPU": 8.0}, 1),                             # a CPU actor's real share is 1/16 node
    ({"CPU": 4.0}, {"CPU": 8.0}, 4),                             # whole CPUs: as many threads
    ({"CPU": 2.5}, {"CPU": 64.0}, 3),                            # at least ceil(own CPUs)
    ({"CPU": 0.5, "GPU": 1.0}, {"CPU": 3.0, "GPU": 2.0}, 1),     # floor(1.5)
    ({}, {"CPU": 8.0}, 1),                                       # nothing assigned: one thread
    ({"CPU": 0.5, "memory": 2e9, "node:10.0.0.1": 0.001}, {"CPU": 8.0, "memory": 4e9, "node:10.0.0.1": 1.0}, 1),
    ({"CPU": 0.5, "GPU": 1.0}, {"CPU": 8.0}, 1),                 # a resource the node does not list: ignored
])
def test_threads_follow_the_actors_share_of_its_node(assigned, node, expected):
    assert threads_for_share(assigned, node) == expected


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_asks_the_resolver_and_numbers_are_used_as_given(restore_threads):
    calls = []
    assert set_probe_threads("auto", lambda: calls.append(1) or 3) == 3
    assert calls == [1]
    assert set_probe_threads(2, lambda: calls.append(1) or 5) == 2 and calls == [1]  # a number: resolver unused
    assert set_probe_threads("auto", lambda: None) == 2  # no answer: the process's setting stands
    assert set_probe_threads("auto", None) == 2
    assert set_probe_threads(None, None) == 2


def test_probe_actor_applies_the_resolved_threads(restore_threads):
    torch.set_num_threads(1)
    actor = ProbeActor({"backend": "tiny"}, {"diffusion_cam": {"preset": "diffusion_cam"}}, {"threads": "auto"},
                       threads_resolver=lambda: 2)
    assert actor.threads == 2 and torch.get_num_threads() == 2


def test_actor_on_a_ray_node_gets_its_gpu_share_of_the_nodes_cpus(ray_local):
    # Regression: before, a fractional-CPU actor on an existing cluster kept Ray's single thread.
    # ray_local: one node with 2 CPUs and 1 logical GPU; an actor holding the GPU gets both cores.
    from dcam.pipeline.node_threads import actor_node_threads

    @ray_local.remote(num_cpus=0.5, num_gpus=1)
    class Probe:
        def threads(self):
            return actor_node_threads(), ray_local.get_runtime_context().get_assigned_resources()

    a = Probe.remote()
    threads, assigned = ray_local.get(a.threads.remote(), timeout=120)
    ray_local.kill(a)
    assert assigned == {"CPU": 0.5, "GPU": 1.0}
    assert threads == 2


def test_outside_ray_the_resolver_says_nothing(monkeypatch):
    import ray

    from dcam.pipeline.node_threads import actor_node_threads

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert actor_node_threads() is None
