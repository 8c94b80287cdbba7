"""Configuration: conf/<command>.yaml + omegaconf dotlist overrides, validated against the
command's schema (pipeline/config_schema.py) before anything starts.

`model=<name>` selects conf/model/<name>.yaml as the whole `model` node (a config group, as in
Hydra); further `model.x=y` overrides apply on top. The config hash identifies what was run: it
covers the keys that change the output rows (model identity and generation settings, methods,
probe and refine settings, source field mapping, decode limits, seeds) and none that only change
how fast or where (batch sizes, pool sizes, threads, CPUs/GPUs, object store, progress bars,
report settings, storage credentials): schema fields marked `hashed=False`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcam.conf import CONF_DIR, conf_path
from dcam.pipeline.config_check import ConfigError, schema_of, validate
from dcam.pipeline.config_schema import SCHEMAS, RunConfig

GROUPS = ("model",)

__all__ = ["ConfigError", "config_hash", "hashed_view", "load_config", "to_dict"]


def load_config(command: str, overrides: list[str] | None = None, schema: type | None = None) -> DictConfig:
    """The merged config of `command`, validated against `schema` (default: SCHEMAS[command])."""
    schema = schema or SCHEMAS.get(command)
    if schema is None:
        raise TypeError(f"no config schema for {command!r}: pass schema= (every command's config is validated)")
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    cfg = OmegaConf.load(conf_path(command))
    rest = []
    for o in overrides:
        key, value = o.split("=", 1)
        if key in GROUPS:
            cfg[key] = _group(key, value)
        else:
            rest.append(o)
    for group in GROUPS:  # a group given by name in the base YAML
        if isinstance(cfg.get(group), str):
            cfg[group] = _group(group, cfg[group])
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as e:  # grammar errors (`a=${`), a key both a value and a section
        raise ConfigError(f"cannot parse overrides {rest}: {str(e).splitlines()[0]}") from None
    return validate(OmegaConf.to_container(cfg, resolve=True), schema)


def _group(group: str, name: str) -> DictConfig:
    """conf/<group>/<name>.yaml, or ConfigError naming the known ones."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{group}={name}: no conf/{group}/{name}.yaml; known: {', '.join(known)}")
    return OmegaConf.load(path)


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def hashed_view(cfg, schema: type = RunConfig) -> dict:
    """The result-relevant part of a config: every field whose schema marks it hashed. `synth`
    counts only when the run synthesises its input (input is null)."""
    d = to_dict(cfg)
    view = _hashed(d, schema)
    if d.get("input") is not None:
        view.pop("synth", None)
    return view


def _hashed(d: dict, schema: type) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.name not in d or not f.metadata.get("hashed", True):
            continue
        value = d[f.name]
        sub = schema_of(schema, f.name, value)
        out[f.name] = _hashed(value, sub) if sub is not None and isinstance(value, dict) else value
    return out


def config_hash(cfg) -> str:
    """12 hex digits over the result-relevant part of the config (`hashed_view`)."""
    blob = json.dumps(hashed_view(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (an empty mapping stays a leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every dotted key whose value differs (missing = None)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
