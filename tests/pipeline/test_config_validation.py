"""Config validation (pipeline/config_schema.py, pipeline/config_check.py): every malformed key, type or
value is refused with one line naming the key, before Ray starts; the config hash covers only what
changes results; every command validates its config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcam.conf import CONF_DIR
from dcam.pipeline.cli import main
from dcam.pipeline.config import ConfigError, config_hash, hashed_view, load_config
from dcam.pipeline.config_schema import MODEL_SCHEMAS

KNOWN_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))

ROOT = Path(__file__).resolve().parents[2]

# (overrides, what the one-line error must contain)
MALFORMED = [
    (["probe.batchsize=4"], "unknown key probe.batchsize (did you mean probe.batch_size?)"),
    (["n=500"], "unknown key n (did you mean synth.n?)"),
    (["outptu=/tmp/x"], "unknown key outptu (did you mean output?)"),
    (["probe.state=trajectory"], "methods.<name>.probe.state"),
    (["model.gen_stepz=3"], "unknown key model.gen_stepz (did you mean model.gen_steps?)"),
    (["model=diffusion_gemma", "model.temperature=0.5"], "unknown key model.temperature"),
    (["storage.endpoint=http://x"], "unknown key storage.endpoint (did you mean storage.endpoint_url?)"),
    (["methods.m.presett=grad_cam"], "unknown key methods.m.presett (did you mean methods.m.preset?)"),
    (["methods.m.probe.stat=trajectory"], "unknown key methods.m.probe.stat (did you mean methods.m.probe.state?)"),
    (["methods.m.refine.akdd=true"], "unknown key methods.m.refine.akdd (did you mean methods.m.refine.akd?)"),
    (["probe.batch_size=four"], "probe.batch_size = 'four': expected an integer"),
    (["probe.faithfulness_steps=2.5"], "probe.faithfulness_steps = 2.5: expected an integer"),
    (["probe.per_step=maybe"], "probe.per_step = 'maybe': expected true or false"),
    (["sink.thumbnails=3"], "sink.thumbnails = 3: expected true or false"),
    (["methods.m.probe.rows_per_pass=x"], "methods.m.probe.rows_per_pass = 'x': expected an integer"),
    (["probe=3"], "probe is a section of keys"),
    (["probe.batch_size=-3"], "probe.batch_size = -3: must be >= 1"),
    (["probe.batch_size=0"], "probe.batch_size = 0: must be >= 1"),
    (["probe.rows_per_pass=0"], "probe.rows_per_pass = 0: must be >= 1"),
    (["probe.faithfulness_steps=-1"], "probe.faithfulness_steps = -1: must be >= 0"),
    (["probe.threads=0"], "probe.threads = 0: allowed: auto, null or an integer >= 1"),
    (["actors.num_gpus=-1"], "actors.num_gpus = -1.0: must be >= 0"),
    (["actors.pool_min=2"], "actors.pool_max = 1: must be >= actors.pool_min (2)"),
    (["decode_num_cpus=0"], "decode_num_cpus = 0.0: must be > 0"),
    (["report.max_error_rate=1.5"], "report.max_error_rate = 1.5: must be <= 1 (a fraction in [0, 1])"),
    (["report.max_error_rate=-0.1"], "report.max_error_rate = -0.1: must be >= 0 (a fraction in [0, 1])"),
    (["report.grounding_threshold=2"], "report.grounding_threshold = 2.0: must be <= 1"),
    (["model.temperature=-1"], "model.temperature = -1.0: must be >= 0"),
    (["storage.retry_attempts=0"], "storage.retry_attempts = 0: must be >= 1"),
    (["probe.targets=nouns"], "probe.targets = 'nouns': allowed: content | all | index:<k>"),
    (["format=tar"], "format = 'tar': must be one of auto, parquet, webdataset"),
    (["model.dtype=fp8"], "model.dtype = 'fp8': must be one of auto, bfloat16"),
    (["methods.m.preset=gradcam"], "methods.m.preset = 'gradcam': must be one of diffusion_cam"),
    (["methods.m.probe.state=final"], "methods.m.probe.state = 'final': must be one of trajectory"),
    (["methods.m.probe.variant=cam"], "methods.m.probe.variant = 'cam': must be one of"),
    (["methods.m.probe.contrast=max"], "methods.m.probe.contrast = 'max': must be one of"),
    (["report.fail_under=obj_io=0.3"], "report.fail_under = 'obj_io=0.3': allowed: metric=value pairs"),
    (["report.fail_under=map_top10=0.5", "report.enabled=false"], "only the report computes"),
    (["model=nope"], "model=nope: no conf/model/nope.yaml; known: " + ", ".join(KNOWN_MODELS)),
    (["model.backend=nonesuch"], "model.backend = 'nonesuch': no schema for this backend"),
    (["probe.batch_size"], "overrides must look like key=value"),
]


@pytest.mark.parametrize("overrides,message", MALFORMED, ids=[" ".join(o) for o, _ in MALFORMED])
def test_malformed_config_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("run", overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("overrides", [["probe.batch_size=8"], ["probe.batch_size='8'"], ["probe.targets=index:2"],
                                       ["probe.threads=2"], ["probe.threads=null"], ["methods.m=grad_cam"],
                                       ["methods.m.probe.state=remask_target", "methods.m.refine.akd=true"],
                                       ["report.fail_under=obj_iou=0.3,error_rate=0.1"], ["storage.client_kwargs={}"],
                                       ["report.fail_under=grounded_rate=0.9", "report.enabled=false"],
                                       ["report.grounding_threshold=0.05"],
                                       ["model=diffusion_gemma", "model.max_soft_tokens=280"]])
def test_valid_configs_pass(overrides):
    load_config("run", overrides)


def test_every_model_yaml_has_a_schema_and_validates():
    from dcam.conf import CONF_DIR

    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        cfg = load_config("run", [f"model={path.stem}"])
        assert cfg.model.backend in MODEL_SCHEMAS, path.name


def test_cli_refuses_bad_config_in_one_line_before_ray_starts(tmp_path):
    """`dcam run` with a typo, a wrong type, a bad value: exit 2, one line on stderr each, no traceback,
    Ray never imported (so never initialised), the output never created. A fresh interpreter, so the
    session's Ray (other tests) cannot hide an import."""
    out = tmp_path / "out"
    code = f"""
import json, sys
from dcam.pipeline.cli import main
bad = ("probe.batchsize=4", "probe.batch_size=four", "probe.batch_size=-3")
codes = [main(["run", "output={out}", o]) for o in bad]
print(json.dumps(dict(codes=codes, ray="ray" in sys.modules)))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    err = p.stderr.strip().splitlines()
    assert res == dict(codes=[2, 2, 2], ray=False), p.stderr
    assert len(err) == 3 and "Traceback" not in p.stderr
    assert "unknown key probe.batchsize" in err[0] and "expected an integer" in err[1] and "must be >= 1" in err[2]
    assert not out.exists()


@pytest.mark.parametrize("command", ["synth", "eval-tiny", "eval-cam", "bench", "bench-probe", "bench-refine",
                                     "train-tiny"])
def test_every_command_validates_its_config(command, capsys):
    assert main([command, "bogus_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key bogus_key" in err[0]


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["run", "probe.batch_size=four", "--debug"])


def test_hash_ignores_throughput_and_location_keys_only():
    base = config_hash(load_config("run", ["input=/x"]))
    same = ["probe.batch_size=4", "probe.rows_per_pass=8", "probe.threads=3", "actors.pool_max=4", "actors.num_gpus=1",
            "actors.num_cpus=2", "decode_num_cpus=1", "score_num_cpus=1", "ray.num_cpus=8",
            "ray.object_store_memory=1000", "ray.progress_bars=false", "report.enabled=false",
            "report.fail_under=obj_iou=0.3", "report.max_error_rate=0.1", "storage.key=k", "storage.secret=s",
            "model.device=cpu", "model.cache_dir=/c", "source.batch_rows=16", "output=s3://b/o", "input=/y",
            "synth.n=3"]
    together = load_config("run", ["input=/x", *same])  # one load: pytest shows the differing keys
    assert hashed_view(together) == hashed_view(load_config("run", ["input=/x"])) and config_hash(together) == base
    differ = ["probe.faithfulness_steps=3", "probe.targets=all", "probe.seed=1", "probe.per_step=true",
              "methods.diffusion_cam.preset=grad_cam", "methods.diffusion_cam.refine.akd=true", "model.gen_steps=6",
              "model.dtype=float32", "model.source=/ckpt", "source.response_field=null", "decode.max_pixels=100",
              "format=parquet", "sink.thumbnail_size=64"]
    for o in differ:
        assert config_hash(load_config("run", ["input=/x", o])) != base, o
    # synth counts only when the run synthesises its input
    assert config_hash(load_config("run", ["synth.n=3"])) != config_hash(load_config("run", []))
    assert "storage" not in hashed_view(load_config("run", ["storage.secret=s"]))
