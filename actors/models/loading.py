"""Where checkpoints come from: a local directory, any fsspec URL (s3://, gs://, ...) copied once
to a local cache, or a hub id resolved from the local Hugging Face cache only (never downloaded).

Remote code is never executed unless the caller passes trust_remote_code=True explicitly; a
checkpoint whose config asks for it (an `auto_map` entry) is refused with a message that says so.
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
                       allowed_schemes=ALLOWED_SCHEMES) -> str:
    """Return a local directory holding the checkpoint named by `source`."""
    scheme = _scheme(source)
    if scheme not in allowed_schemes:
        raise CheckpointError(f"model source scheme {scheme!r} is not allowed (allowed: {list(allowed_schemes)})")
    if scheme in ("file", "local"):
        path = source.split("://", 1)[-1]
        if os.path.isdir(path):
            return path
        if "/" in path and not path.startswith((".", "/")) and len(path.split("/")) == 2:
            return _from_hf_cache(path)
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


def _from_hf_cache(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the cause
        raise CheckpointError(f"{repo_id!r} is not a local directory and is not in the local Hugging Face cache "
                              f"(dcam never downloads from a hub): {type(e).__name__}") from e


def check_remote_code(local_dir: str, trust_remote_code: bool) -> None:
    """Refuse a checkpoint that needs remote code unless trust_remote_code was set explicitly."""
    cfg_path = os.path.join(local_dir, "config.json")
    if not os.path.exists(cfg_path):
        return
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("auto_map") and not trust_remote_code:
        raise CheckpointError(
            f"checkpoint {local_dir} declares custom code (auto_map: {sorted(cfg['auto_map'])}); dcam does not execute "
            "code from checkpoints unless model.trust_remote_code=true is set explicitly")
