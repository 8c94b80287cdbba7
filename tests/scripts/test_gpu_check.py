"""scripts/gpu_check.py in its tiny CPU configuration, so the GPU check cannot rot: it runs every
backend, prints one JSON object with the documented keys and sane values, and imports neither Ray
nor pyarrow (the GPU machine has torch and transformers only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
WRAPPER = """
import json, runpy, sys
sys.argv = [sys.argv[1], "--tiny", "--device", "cpu"]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("IMPORTED " + json.dumps({m: m in sys.modules for m in ("ray", "pyarrow", "omegaconf")}), file=sys.stderr)
sys.exit(code)
"""
PHASES = {"response", "attribution", "faithfulness", "faithfulness_refine", "grounding"}


def test_tiny_cpu_gpu_check_prints_the_documented_json():
    p = subprocess.run([sys.executable, "-c", WRAPPER, str(SCRIPT)], capture_output=True, text=True, timeout=400,
                       cwd="/")  # from anywhere: the script finds dcam beside itself
    assert p.returncode == 0, p.stderr[-4000:]
    imported = json.loads(p.stderr.rsplit("IMPORTED ", 1)[1].splitlines()[0])
    assert not imported["ray"] and not imported["pyarrow"], imported
    out = json.loads(p.stdout)
    assert {"device", "device_name", "torch", "transformers", "tiny", "n_images", "batch_size", "dtype", "backends",
            "errors"} <= set(out)
    assert out["errors"] == {} and out["tiny"] is True and out["device"] == "cpu"
    assert set(out["backends"]) == {"diffusion_gemma", "lavida", "llada_v", "mmada"}
    for name, b in out["backends"].items():
        assert {"config", "params_m", "build_s", "batched", "batch1", "batched_over_batch1", "bf16_vs_fp32",
                "peak_gpu_mem_gb"} <= set(b), name
        for side in ("batched", "batch1"):
            assert b[side]["images_per_s"] > 0 and set(b[side]["s_per_image"]) == PHASES
        assert b["batched"]["batch_size"] == 2 and b["batch1"]["batch_size"] == 1
        agree = b["bf16_vs_fp32"]
        assert agree["maps"] > 0 and 0.9 < agree["corr_mean"] <= 1.0 and -1.0 <= agree["corr_min"] <= agree["corr_mean"]
        assert 0.0 <= agree["argmax_agreement"] <= 1.0
        assert b["peak_gpu_mem_gb"] is None and b["params_m"] > 0
