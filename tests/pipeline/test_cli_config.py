import json

import pytest

from dcam.pipeline.cli import _options_first, _parser, main
from dcam.pipeline.config import ConfigError, config_hash, load_config


def test_group_selection_and_overrides():
    cfg = load_config("run", ["model=tiny", "model.gen_steps=4", "probe.batch_size=3"])
    assert cfg.model.backend == "tiny" and cfg.model.gen_steps == 4 and cfg.probe.batch_size == 3
    with pytest.raises(ConfigError, match="known"):
        load_config("run", ["model=nope"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("run", ["probe.batch_size"])


def test_config_hash_ignores_where_output_goes_but_not_what_is_computed():
    a = config_hash(load_config("run", ["output=/a", "input=/x"]))
    assert a == config_hash(load_config("run", ["output=s3://b/c", "input=/y", "ray.num_cpus=8", "actors.pool_max=4"]))
    assert a != config_hash(load_config("run", ["probe.faithfulness_steps=3"]))
    assert a != config_hash(load_config("run", ["methods.diffusion_cam.preset=grad_cam"]))


def test_options_may_follow_overrides():
    a = _parser().parse_args(["report", *_options_first(["RUN", "k=3", "--json", "--fail-under", "obj_iou=0.3"])])
    assert a.run_dir == "RUN" and a.overrides == ["k=3"] and a.json and a.fail_under == "obj_iou=0.3"


def test_synth_json_is_one_object_and_shards_are_byte_identical(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["synth", f"output={tmp_path / name}", "n=10", "shard_size=4", "seed=1234", "--json"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and json.loads(out[0])["n"] == 10
    fa, fb = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [f.name for f in fa] == [f.name for f in fb] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    main(["synth", f"output={tmp_path / 'c'}", "n=10", "shard_size=4", "seed=1235", "--json"])
    assert (tmp_path / "c" / "shard-00000.parquet").read_bytes() != fa[0].read_bytes()
