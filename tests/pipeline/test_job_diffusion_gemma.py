"""`dcam run model=diffusion_gemma` end to end on a tiny random DiffusionGemmaForBlockDiffusion saved
by the test (no download): checkpoint from a local directory and from an S3 prefix (moto on
127.0.0.1), the same rows and maps either way."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from jobutil import FAST, _keys, _maps, _results, _run, _upload

from dcam.actors import scenes
from dcam.actors.models.diffusion_gemma import tiny_config
from dcam.pipeline.synth import write_corpus

pytestmark = pytest.mark.slow

DG = ["model=diffusion_gemma", "model.max_soft_tokens=70", "model.gen_steps=2", "model.response_len=8",
      "source.response_field=null",  # generate: the scene captions are longer than this canvas
      "probe.faithfulness_steps=0"]


@pytest.fixture(scope="module")
def dg_ckpt(tmp_path_factory):
    from transformers import DiffusionGemmaForBlockDiffusion

    d = tmp_path_factory.mktemp("dg-ckpt")
    torch.manual_seed(0)
    DiffusionGemmaForBlockDiffusion(tiny_config()).eval().save_pretrained(str(d))
    return d


def test_run_diffusion_gemma_from_local_dir_and_s3_prefix(ray_local, tmp_path, s3_bucket, dg_ckpt):
    so = s3_bucket.storage_options
    write_corpus(str(tmp_path / "in"), 4, 1120, 2, scenes.SceneConfig(size=96))
    storage = [f"storage.{k}={so[k]}" for k in ("endpoint_url", "key", "secret", "region")]
    local = _run([f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", f"model.source={dg_ckpt}", *FAST, *DG])
    assert local["inputs"] == 4 and local["ok"] == 4 and local["errors"] == {}
    t = _results(str(tmp_path / "out"))
    ok = t.filter(pc.equal(t["status"], "ok"))
    assert ok.num_rows >= 4 and set(ok["id"].to_pylist()) == set(t["id"].to_pylist())
    assert set(ok["model_id"].to_pylist()) == {str(dg_ckpt)}
    # maps on the checkpoint's soft-token grid for these scenes at a 70-token budget
    from transformers import DiffusionGemmaForBlockDiffusion

    from dcam.actors.models.diffusion_gemma import DiffusionGemmaBackend

    be = DiffusionGemmaBackend(DiffusionGemmaForBlockDiffusion.from_pretrained(str(dg_ckpt)), max_soft_tokens=70)
    span = be.prepare([np.zeros((96, 96, 3), np.uint8)], ["x"])[0].spans[0]
    assert set(zip(ok["map_h"].to_pylist(), ok["map_w"].to_pylist())) == {(span.rows, span.cols)}
    assert all(len(m) == span.rows * span.cols for m in ok["map"].to_pylist())
    assert all(np.isfinite(np.asarray(m)).all() for m in ok["map"].to_pylist())

    remote = _upload(dg_ckpt, s3_bucket, "checkpoints/dg")
    s = _run([f"input={tmp_path / 'in'}", f"output={s3_bucket.url}/audit-dg", f"model.source={remote}",
              f"model.cache_dir={tmp_path / 'cache'}", *FAST, *DG, *storage])
    assert s["inputs"] == 4 and s["ok"] == 4
    r = _results(f"{s3_bucket.url}/audit-dg", so)
    assert set(r["model_id"].to_pylist()) == {remote.removeprefix("s3://")}  # the backend's id: bucket/prefix
    assert _keys(r) == _keys(t)  # same explained tokens, same rows
    for a, b in zip(_maps(r), _maps(t)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # same weights, same maps
