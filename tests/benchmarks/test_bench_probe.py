"""`dcam bench-probe --json` runs end to end and prints one JSON object with its figures (a
smoke test: timings are never asserted in tests)."""
import json

from dcam.pipeline.cli import main


def test_bench_probe_json_has_ratio_and_phase_breakdown(capsys):
    assert main(["bench-probe", "n=4", "batch_size=2", "faithfulness_steps=2", "threads=1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"batched_ips", "single_ips", "ratio", "ratio_without_faithfulness"} <= set(res)
    assert res["batched_ips"] > 0 and res["single_ips"] > 0 and res["faithfulness_steps"] == 2
    for side in ("batched_s_per_image", "single_s_per_image"):
        assert set(res[side]) == {"response", "attribution", "faithfulness", "faithfulness_refine", "grounding"}
        assert all(v > 0 for v in res[side].values())
        assert res[side]["faithfulness_refine"] < res[side]["faithfulness"]  # a part of it
    assert res["faithfulness_sample"] == 1.0
