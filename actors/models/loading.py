"""Where checkpoints come from: a local directory, any fsspec URL (s3://, gs://, ...) copied once
to a local cache, or a hub id resolved from the local Hugging Face cache only (never downloaded).

Remote code is never executed unless the caller passes trust_remote_code=True explicitly; a
checkpoint whose config asks for it (an `auto_map` entry) is refused with a message that says so.
One exemption: a native backend (LaViDa, LLaDA-V) declares the model_types it implements, and a
checkpoint's config.json of such a type may carry an auto_map: dcam builds the model itself and
never imports that code (`native_model_types`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import fsspec

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dcam", "checkpoints")
ALLOWED_SCHEMES = ("file", "local", "s3", "gs", "gcs", "abfs", "az", "hf", "memory")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as configured (missing, remote code, bad scheme)."""


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def resolve_checkpoint(source: str, cache_dir: str | None = None, storage_options: dict | None = None,
                       allowed_schemes=ALLOWED_SCHEMES, hf_cache_dir: str | None = None) -> str:
    """Return a local directory holding the checkpoint named by `source`.

    - a local directory (or file://, local://) is used in place;
    - `owner/name` that is not a local directory, or hf://owner/name[@revision], is looked up in the
      local Hugging Face cache only (`hf_cache_dir`, else HF_HUB_CACHE / HF_HOME): never downloaded;
    - any other allowed fsspec URL (s3://, gs://, ...) is copied once to `cache_dir`/<hash of the URL>
      (a marker file makes the copy complete; concurrent actors on one node race safely)."""
    scheme = _scheme(source)
    if scheme not in allowed_schemes:
        raise CheckpointError(f"model source scheme {scheme!r} is not allowed (allowed: {list(allowed_schemes)})")
    if scheme == "hf":
        repo = source.split("://", 1)[1].strip("/")
        repo, _, revision = repo.partition("@")
        if len(repo.split("/")) != 2:
            raise CheckpointError(f"hf:// source must name owner/name[@revision], got {source!r}")
        return _from_hf_cache(repo, cache_dir=hf_cache_dir, revision=revision or None)
    if scheme in ("file", "local"):
        path = source.split("://", 1)[-1]
        if os.path.isdir(path):
            return path
        if "/" in path and not path.startswith((".", "/")) and len(path.split("/")) == 2:
            return _from_hf_cache(path, cache_dir=hf_cache_dir)
        raise CheckpointError(f"checkpoint directory not found: {path}")
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/")
    key = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
    local = Path(cache_dir or DEFAULT_CACHE) / key
    done = local / ".dcam-complete"
    if done.exists():
        return str(local)
    files = [f for f in fs.find(root) if not f.endswith("/")]
    if not files:
        raise CheckpointError(f"no checkpoint files under {source}")
    tmp = local.with_name(local.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        rel = os.path.relpath(f, root)
        if rel.startswith("..") or os.path.isabs(rel):
            raise CheckpointError(f"refusing checkpoint file outside its prefix: {f}")
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(dest))
    (tmp / ".dcam-complete").write_text(source)
    if local.exists():  # another actor on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, local)
    return str(local)


def _from_hf_cache(repo_id: str, cache_dir: str | None = None, revision: str | None = None) -> str:
    """The snapshot of `repo_id` already in the local Hugging Face cache (local_files_only: the hub
    is never contacted, whatever HF_HUB_OFFLINE says)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir, revision=revision)
    except Exception as e:  # noqa: BLE001 - re-raised with the cause
        raise CheckpointError(f"{repo_id!r} is not a local directory and is not in the local Hugging Face cache "
                              f"(dcam never downloads from a hub): {type(e).__name__}") from e


# Files whose `auto_map` makes transformers import Python code shipped with the checkpoint.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                       "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json")


def _auto_map_refusal(where: str, name: str, cfg, native_model_types: tuple[str, ...]) -> CheckpointError | None:
    """The error for a config file that asks for remote code (`auto_map`), or None. The model config
    (config.json) of a model_type a native backend implements is exempt: dcam builds that model
    itself and never imports the checkpoint's code."""
    if not (isinstance(cfg, dict) and cfg.get("auto_map")):
        return None
    if name == "config.json" and cfg.get("model_type") in native_model_types:
        return None
    auto_map = cfg["auto_map"]
    keys = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
    return CheckpointError(f"checkpoint {where} declares custom code in {name} (auto_map: {keys}); dcam does not "
                           "execute code from checkpoints unless model.trust_remote_code=true is set explicitly")


def check_remote_code(local_dir: str, trust_remote_code: bool, native_model_types: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint that needs remote code unless trust_remote_code was set explicitly: an
    `auto_map` entry in its model config or in any tokenizer / processor config. `native_model_types`:
    the model_types the chosen backend implements natively (their model config's auto_map is ignored)."""
    if trust_remote_code:
        return
    for name in REMOTE_CODE_CONFIGS:
        cfg_path = os.path.join(local_dir, name)
        if not os.path.exists(cfg_path):
            continue
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {local_dir}: unreadable {name}: {type(e).__name__}") from None
        err = _auto_map_refusal(local_dir, name, cfg, native_model_types)
        if err is not None:
            raise err


def preflight(source: str | None, trust_remote_code: bool = False, storage_options: dict | None = None,
              allowed_schemes=ALLOWED_SCHEMES, native_model_types: tuple[str, ...] = ()) -> None:
    """Cheap checks in the driver before any worker starts: scheme allowed, checkpoint present,
    no remote code unless allowed (`native_model_types`: see check_remote_code). Reads the small
    config files only (never copies the weights)."""
    if not source:
        return
    scheme = _scheme(source)
    if scheme not in allowed_schemes:
        raise CheckpointError(f"model source scheme {scheme!r} is not allowed (allowed: {list(allowed_schemes)})")
    if scheme == "hf":  # the local HF cache only: fsspec's hf:// would contact the hub
        check_remote_code(resolve_checkpoint(source, allowed_schemes=allowed_schemes), trust_remote_code,
                          native_model_types)
        return
    if scheme in ("file", "local"):
        path = source.split("://", 1)[-1]
        if not os.path.isdir(path):
            if "/" in path and not path.startswith((".", "/")) and len(path.split("/")) == 2:
                return  # a hub id: resolved from the local cache by the worker
            raise CheckpointError(f"checkpoint directory not found: {path}")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CheckpointError(f"no config.json in checkpoint directory {path}")
        check_remote_code(path, trust_remote_code, native_model_types)
        return
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    cfg_path = root.rstrip("/") + "/config.json"
    if not fs.exists(cfg_path):
        raise CheckpointError(f"no config.json under {source}")
    if trust_remote_code:
        return
    for name in REMOTE_CODE_CONFIGS:  # small JSON files only: the weights are never read here
        path = root.rstrip("/") + "/" + name
        if name != "config.json" and not fs.exists(path):
            continue
        try:
            cfg = json.loads(fs.cat_file(path))
        except ValueError as e:
            raise CheckpointError(f"checkpoint {source}: unreadable {name}: {type(e).__name__}") from None
        err = _auto_map_refusal(source, name, cfg, native_model_types)
        if err is not None:
            raise err
