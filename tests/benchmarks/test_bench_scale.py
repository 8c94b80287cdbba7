"""`dcam bench-scale --json`: a small run (1 stand-in actor, 32 images) on its own local multi-node
Ray prints one JSON object with the documented keys (timings are never asserted: shared machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_scale_json_has_efficiency_cpu_per_stage_and_plan():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never the session's cluster
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.run([sys.executable, "-m", "dcam", "bench-scale", "--json", "actors=[1]", "images_per_actor=32",
                        "gpu_s_per_image=0.02", "nodes=2", "node_gpus=1", "shard_size=8", "grid=9", "words=3",
                        "plan_gpu_s_per_image=[0.1]"], env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert "SIMULATION" in res["simulation"]
    assert {"points", "plan", "bottleneck", "machine_cores", "load_average_1m", "cluster"} <= set(res)
    (pt,) = res["points"]
    assert pt["actors"] == 1 and pt["images"] == 32 and pt["ideal_images_per_s"] == 50.0
    assert 0 < pt["efficiency"] <= 1.5 and pt["steady_images"] > 0
    assert set(pt["cpu_s_per_image"]) == {"decode", "refine", "write"}
    assert all(v > 0 for v in pt["cpu_s_per_image"].values())
    assert pt["cluster_cpu_s_per_image"] > 0
    stages = sum(pt["cpu_s_per_image"].values())
    assert res["plan"]["cores_per_gpu_actor"]["0.1"]["stages"] == stages / 0.1
