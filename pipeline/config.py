"""Configuration: conf/<command>.yaml + omegaconf dotlist overrides.

`model=<name>` selects conf/model/<name>.yaml as the whole `model` node (a config group, as in
Hydra); further `model.x=y` overrides apply on top. The config hash identifies what was run: it
covers everything that changes the output rows and nothing that only changes where they go.
"""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from dcam.conf import conf_path

GROUPS = ("model",)
NOT_HASHED = ("input", "output", "ray", "actors", "storage", "report", "testing", "progress", "lease")


def load_config(command: str, overrides: list[str] | None = None) -> DictConfig:
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    cfg = OmegaConf.load(conf_path(command))
    rest = []
    for o in overrides:
        key, value = o.split("=", 1)
        if key in GROUPS:
            cfg[key] = OmegaConf.load(conf_path(f"{key}/{value}"))
        else:
            rest.append(o)
    for group in GROUPS:  # a group given by name in the base YAML
        if isinstance(cfg.get(group), str):
            cfg[group] = OmegaConf.load(conf_path(f"{group}/{cfg[group]}"))
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    return cfg


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def config_hash(cfg) -> str:
    """12 hex digits over the output-relevant part of the config."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in NOT_HASHED}
    for k in ("device", "cache_dir", "hf_cache_dir", "storage_options"):  # where, not what
        d.get("model", {}).pop(k, None)
    d.get("probe", {}).pop("threads", None)  # how fast, not what
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
