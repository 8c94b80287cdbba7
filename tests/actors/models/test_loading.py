"""Checkpoint resolution: local dirs, fsspec URLs copied once, the local HF cache only, remote-code refusal."""
import json
import os
import socket

import pytest

from dcam.actors.models.loading import CheckpointError, check_remote_code, preflight, resolve_checkpoint

HASH = "0123456789abcdef0123456789abcdef01234567"


def _ckpt(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma", **config}))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def _hf_cache(root, repo="acme/tiny-dg"):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(HASH)
    _ckpt(base / "snapshots" / HASH)
    return base / "snapshots" / HASH


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a connection (the hub must never be contacted)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_local_directory_is_used_in_place(tmp_path):
    ck = _ckpt(tmp_path / "ck")
    assert resolve_checkpoint(str(ck)) == str(ck)
    assert resolve_checkpoint(f"file://{ck}") == str(ck)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="not allowed"):
        resolve_checkpoint("ftp://example.invalid/ck")


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, no_network):
    snap = _hf_cache(tmp_path / "hub")
    assert os.path.samefile(resolve_checkpoint("acme/tiny-dg", hf_cache_dir=str(tmp_path / "hub")), snap)
    assert os.path.samefile(resolve_checkpoint("hf://acme/tiny-dg", hf_cache_dir=str(tmp_path / "hub")), snap)
    assert os.path.samefile(resolve_checkpoint(f"hf://acme/tiny-dg@{HASH}", hf_cache_dir=str(tmp_path / "hub")), snap)
    with pytest.raises(CheckpointError, match="never downloads"):
        resolve_checkpoint("acme/not-cached", hf_cache_dir=str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="never downloads"):
        resolve_checkpoint("hf://acme/not-cached", hf_cache_dir=str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="owner/name"):
        resolve_checkpoint("hf://just-a-name")
    assert no_network == []


def test_diffusion_gemma_loads_from_a_hub_id_in_the_local_cache(tmp_path, no_network):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from dcam.actors.models import load_backend
    from dcam.actors.models.diffusion_gemma import DiffusionGemmaBackend, tiny_config

    snap = _hf_cache(tmp_path / "hub")
    (snap / "model.safetensors").unlink()
    (snap / "config.json").unlink()
    torch.manual_seed(0)
    DiffusionGemmaForBlockDiffusion(tiny_config()).save_pretrained(str(snap))
    be = load_backend({"backend": "diffusion_gemma", "source": "acme/tiny-dg", "hf_cache_dir": str(tmp_path / "hub"),
                       "device": "cpu"})
    assert isinstance(be, DiffusionGemmaBackend) and be.model_id == "acme/tiny-dg"
    assert no_network == []


def test_fsspec_url_is_copied_once_into_the_cache(tmp_path, s3_bucket):
    import fsspec

    opts = {k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")}
    fs = fsspec.filesystem("s3", **opts)
    ck = _ckpt(tmp_path / "ck")
    (ck / "sub").mkdir()
    (ck / "sub" / "extra.json").write_text("{}")
    for rel in ("config.json", "model.safetensors", "sub/extra.json"):
        fs.put_file(str(ck / rel), f"{s3_bucket.name}/models/ck/{rel}")
    url = f"{s3_bucket.url}/models/ck"
    local = resolve_checkpoint(url, cache_dir=str(tmp_path / "cache"), storage_options=opts)
    assert sorted(os.listdir(local)) == [".dcam-complete", "config.json", "model.safetensors", "sub"]
    assert open(os.path.join(local, "sub", "extra.json")).read() == "{}"
    fs.rm(f"{s3_bucket.name}/models/ck", recursive=True)  # a second actor on the node needs no remote access
    assert resolve_checkpoint(url + "/", cache_dir=str(tmp_path / "cache"), storage_options=opts) == local
    with pytest.raises(CheckpointError, match="no checkpoint files"):
        resolve_checkpoint(f"{s3_bucket.url}/models/none", cache_dir=str(tmp_path / "cache"), storage_options=opts)


def test_memory_url_copy(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/dcam-test-ck/config.json": b'{"model_type": "diffusion_gemma"}', "/dcam-test-ck/w.bin": b"x"})
    local = resolve_checkpoint("memory://dcam-test-ck", cache_dir=str(tmp_path / "cache"))
    assert json.load(open(os.path.join(local, "config.json"))) == {"model_type": "diffusion_gemma"}


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "processor_config.json",
                                  "preprocessor_config.json"])
def test_remote_code_is_refused_unless_trusted(tmp_path, name):
    ck = _ckpt(tmp_path / "ck")
    cfg = json.loads((ck / name).read_text()) if (ck / name).exists() else {}
    cfg["auto_map"] = {"AutoModel": "modeling_evil.Evil"}
    (ck / name).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"custom code in {name}.*trust_remote_code=true"):
        check_remote_code(str(ck), trust_remote_code=False)
    check_remote_code(str(ck), trust_remote_code=True)


def test_native_model_types_exempt_only_their_model_config(tmp_path, s3_bucket):
    """A native backend's model_type may carry an auto_map in config.json (never imported); the same
    auto_map under another model_type, or in a tokenizer config, is still refused."""
    import fsspec

    from dcam.actors.models import native_model_types

    native = native_model_types("lavida")
    assert native == ("llava_llada",) and native_model_types("tiny") == () and native_model_types(None) == ()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llava_llada", "auto_map": {"AutoModel": "m.M"}}))
    check_remote_code(str(ck), trust_remote_code=False, native_model_types=native)
    preflight(str(ck), native_model_types=native)
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        check_remote_code(str(ck), trust_remote_code=False)
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        preflight(str(ck))
    fs = fsspec.filesystem("s3", **{k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")})
    fs.pipe({f"{s3_bucket.name}/n/config.json": (ck / "config.json").read_bytes()})
    opts = {k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")}
    preflight(f"{s3_bucket.url}/n", storage_options=opts, native_model_types=native)
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        preflight(f"{s3_bucket.url}/n", storage_options=opts)
    (ck / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    with pytest.raises(CheckpointError, match="custom code in tokenizer_config.json"):
        check_remote_code(str(ck), trust_remote_code=False, native_model_types=native)
    (ck / "config.json").write_text(json.dumps({"model_type": "other", "auto_map": {"AutoModel": "m.M"}}))
    (ck / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="custom code in config.json"):
        check_remote_code(str(ck), trust_remote_code=False, native_model_types=native)


def test_remote_code_check_passes_plain_checkpoints_and_rejects_unreadable_configs(tmp_path):
    check_remote_code(str(_ckpt(tmp_path / "plain")), trust_remote_code=False)
    check_remote_code(str(tmp_path), trust_remote_code=False)  # no config at all: nothing to refuse
    bad = _ckpt(tmp_path / "bad")
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable tokenizer_config.json"):
        check_remote_code(str(bad), trust_remote_code=False)


def test_preflight_reads_hub_ids_from_the_local_cache_and_every_remote_code_config(tmp_path, s3_bucket, monkeypatch):
    import fsspec

    snap = _hf_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    preflight("hf://acme/tiny-dg")  # resolved locally: hf:// never goes through fsspec's hub filesystem
    (snap / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*trust_remote_code"):
        preflight("hf://acme/tiny-dg")
    with pytest.raises(CheckpointError, match="never downloads"):
        preflight("hf://acme/absent")
    opts = {k: s3_bucket.storage_options[k] for k in ("key", "secret", "endpoint_url")}
    fs = fsspec.filesystem("s3", **opts)
    fs.pipe({f"{s3_bucket.name}/ck/config.json": b'{"model_type": "diffusion_gemma"}',
             f"{s3_bucket.name}/ck/processor_config.json": b'{"auto_map": {"AutoProcessor": "p.P"}}'})
    with pytest.raises(CheckpointError, match="processor_config.json.*trust_remote_code"):
        preflight(f"{s3_bucket.url}/ck", storage_options=opts)
    preflight(f"{s3_bucket.url}/ck", trust_remote_code=True, storage_options=opts)
    fs.rm(f"{s3_bucket.name}/ck/processor_config.json")
    preflight(f"{s3_bucket.url}/ck", storage_options=opts)
