"""`dcam run model=lavida` / `model=llada_v` end to end on tiny random checkpoints saved by the test in
the public layout (reference key names, config.json with auto_map, tokenizer): LaViDa (generating)
from a local directory and from an S3 prefix (moto on 127.0.0.1) with the same rows and maps;
LLaDA-V (replaying given captions) from a local directory."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from jobutil import FAST, _keys, _maps, _results, _run, _upload

from dcam.actors import scenes
from dcam.pipeline.synth import write_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "actors" / "models"))  # the LLaDA test helpers
from llada_testing import lavida_config, llada_v_config, write_checkpoint

pytestmark = pytest.mark.slow

COMMON = ["model.temperature=0", "probe.faithfulness_steps=0", "probe.rows_per_pass=4"]
# LaViDa generates (an 8-token canvas); LLaDA-V replays the scenes' captions (forced trajectory; a random
# tiny model's own answers are mostly non-content bytes), first answer token explained
KIND = {"lavida": (lavida_config, ["model=lavida", "model.step_ratio=0.5", "model.response_len=8",
                                   "source.response_field=null"]),
        "llada_v": (llada_v_config, ["model=llada_v", "model.gen_steps=4", "model.response_len=64",
                                     "probe.targets=index:0"])}


def _check(out, t, source: str, kind: str, directory) -> None:
    assert out["inputs"] == 4 and out["ok"] == 4 and out["errors"] == {}
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert ok.num_rows >= 4 and set(ok["id"].to_pylist()) == set(t["id"].to_pylist())
    assert set(ok["model_id"].to_pylist()) == {source}
    from dcam.actors.models import load_backend

    be = load_backend({"backend": kind, "source": str(directory), "response_len": 8})
    span = be.prepare([np.zeros((96, 96, 3), np.uint8)], ["x"])[0].spans[0]  # the scenes are 96 x 96
    mapped = ok.filter(pc.is_valid(ok["map_h"]))  # a random model's answer may hold no content token: no map
    assert mapped.num_rows >= 1
    assert set(zip(mapped["map_h"].to_pylist(), mapped["map_w"].to_pylist())) == {(span.rows, span.cols)}
    assert all(np.isfinite(np.asarray(m)).all() and len(m) == span.rows * span.cols for m in mapped["map"].to_pylist())


@pytest.mark.parametrize("kind", ["lavida", "llada_v"])
def test_run_from_a_local_checkpoint_directory(ray_local, tmp_path, kind):
    make, over = KIND[kind]
    ck = write_checkpoint(tmp_path / "ck", kind, make(), seed=2)
    write_corpus(str(tmp_path / "in"), 4, 1121, 2, scenes.SceneConfig(size=96))
    out = _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={ck}", *FAST, *over, *COMMON])
    _check(out, _results(str(tmp_path / "out")), ck, kind, ck)


def test_run_lavida_from_an_s3_prefix_gives_the_local_maps(ray_local, tmp_path, s3_bucket):
    make, over = KIND["lavida"]
    ck = write_checkpoint(tmp_path / "ck", "lavida", make(), seed=2)
    write_corpus(str(tmp_path / "in"), 4, 1121, 2, scenes.SceneConfig(size=96))
    local = _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={ck}", *FAST, *over, *COMMON])
    so = s3_bucket.storage_options
    remote = _upload(Path(ck), s3_bucket, "checkpoints/lavida")
    storage = [f"storage.{k}={so[k]}" for k in ("endpoint_url", "key", "secret", "region")]
    s = _run([f"input={tmp_path / 'in'}", f"output={s3_bucket.url}/audit-lavida", f"model.source={remote}",
              f"model.cache_dir={tmp_path / 'cache'}", *FAST, *over, *COMMON, *storage])
    r, t = _results(f"{s3_bucket.url}/audit-lavida", so), _results(str(tmp_path / "out"))
    _check(s, r, remote.removeprefix("s3://"), "lavida", ck)
    assert local["ok"] == 4 and _keys(r) == _keys(t)  # same explained tokens, same rows
    for a, b in zip(_maps(r), _maps(t)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # same weights, same maps
