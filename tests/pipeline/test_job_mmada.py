"""`dcam run model=mmada` end to end on a tiny random checkpoint pair saved by the test in the public
layouts (the MMaDA LM directory with config.json + auto_map and the tokenizer; a MAGVIT-v2 directory),
replaying the scenes' captions (a random tiny model's own answers hold no content token), first answer
token explained, at 256 px (16 x 16 codes, to keep it short): from local directories, then from S3 prefixes (moto on 127.0.0.1) with the same maps."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from jobutil import FAST, _keys, _maps, _results, _run, _upload

from dcam.actors import scenes
from dcam.pipeline.synth import write_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "actors" / "models"))  # the MMaDA test helpers
from mmada_testing import write_mmada_checkpoint, write_vq_checkpoint

pytestmark = pytest.mark.slow

OVER = ["model=mmada", "model.resolution=256", "model.response_len=64", "model.gen_steps=4", "model.block_length=null",
        "model.temperature=0", "probe.targets=index:0", "probe.faithfulness_steps=0", "probe.rows_per_pass=4"]


def _checkpoints(tmp_path):
    return write_mmada_checkpoint(tmp_path / "lm", seed=2), write_vq_checkpoint(tmp_path / "vq", seed=3)


def _check(out, t, source: str) -> None:
    assert out["inputs"] == 4 and out["ok"] == 4 and out["errors"] == {}
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert ok.num_rows >= 4 and set(ok["id"].to_pylist()) == set(t["id"].to_pylist())
    assert set(ok["model_id"].to_pylist()) == {source}
    mapped = ok.filter(pc.is_valid(ok["map_h"]))
    assert mapped.num_rows >= 1
    assert set(zip(mapped["map_h"].to_pylist(), mapped["map_w"].to_pylist())) == {(16, 16)}  # the code grid at 256 px (512 px -> 32 x 32: test_mmada.py)
    assert all(np.isfinite(np.asarray(m)).all() and len(m) == 256 for m in mapped["map"].to_pylist())


def test_run_mmada_from_local_directories_and_from_s3(ray_local, tmp_path, s3_bucket):
    lm, vq = _checkpoints(tmp_path)
    write_corpus(str(tmp_path / "in"), 4, 1121, 2, scenes.SceneConfig(size=96))
    local = _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={lm}",
                  f"model.vq_source={vq}", *FAST, *OVER])
    t = _results(str(tmp_path / "out"))
    _check(local, t, lm)
    so = s3_bucket.storage_options
    rlm, rvq = _upload(Path(lm), s3_bucket, "ck/mmada"), _upload(Path(vq), s3_bucket, "ck/magvitv2")
    storage = [f"storage.{k}={so[k]}" for k in ("endpoint_url", "key", "secret", "region")]
    s = _run([f"input={tmp_path / 'in'}", f"output={s3_bucket.url}/audit-mmada", f"model.source={rlm}",
              f"model.vq_source={rvq}", f"model.cache_dir={tmp_path / 'cache'}", *FAST, *OVER, *storage])
    r = _results(f"{s3_bucket.url}/audit-mmada", so)
    _check(s, r, rlm.removeprefix("s3://"))
    assert _keys(r) == _keys(t)  # same explained tokens, same rows
    for a, b in zip(_maps(r), _maps(t)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # same weights, same maps
