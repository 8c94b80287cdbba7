"""Validation of a merged config against its schema (pipeline/config_schema.py), before anything
starts: no Ray, no I/O. Every problem is one line naming the key:

    unknown key probe.batchsize (did you mean probe.batch_size?)
    probe.batch_size = 'four': expected an integer
    probe.batch_size = -3: must be >= 1
    format = 'tar': must be one of auto, parquet, webdataset, img2dataset_parquet, jsonl, csv, coco

Order: unknown keys (with the closest valid key, difflib), then types (omegaconf structured
configs: the merge converts '8' to 8 and refuses 'four'), then ranges, allowed values and checks
(field metadata), then the method specs (`methods.<name>`: preset, probe and refine fields) and the
`storage` section (open to fsspec options, but a near-miss of one of dcam's own keys is a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcam.pipeline.config_schema import GROUP_FIELDS, check_targets

METHOD_PROBE_KEYS = ("variant", "hook", "state", "contrast")  # per method: methods.<name>.probe.<key>
STORAGE_KEYS = dict(endpoint_url=str, key=str, secret=str, token=str, region=str, anonymous=bool, anon=bool,
                    allowed_schemes=list, retry_attempts=int, retry_base_delay=float)


@functools.lru_cache(maxsize=None)
def hints(cls) -> dict:
    """typing.get_type_hints of a schema class (cached: validation walks the same classes often)."""
    return typing.get_type_hints(cls)


class ConfigError(ValueError):
    """A config that does not match its schema (one line, names the key)."""


def validate(data: dict, schema: type) -> DictConfig:
    """The config as a typed omegaconf DictConfig, or ConfigError."""
    check_unknown(data, schema, "", (data, schema))
    typed = typed_config(data, schema)
    check_values(typed, schema, "")
    if "methods" in data and isinstance(typed.get("methods"), DictConfig):
        check_methods(OmegaConf.to_container(typed.methods, resolve=True))
    if "storage" in data and isinstance(typed.get("storage"), DictConfig):
        check_storage(OmegaConf.to_container(typed.storage, resolve=True), "storage")
    problem = getattr(schema, "cross_check", lambda c: None)(typed)
    if problem:
        raise ConfigError(problem)
    return typed


# -- unknown keys --------------------------------------------------------------------------------
def schema_of(schema: type, name: str, value: Any) -> type | None:
    """The dataclass that describes field `name` holding `value` (None: free-form or a leaf)."""
    if name in GROUP_FIELDS and isinstance(value, dict):
        registry = GROUP_FIELDS[name]
        backend = value.get("backend")
        if backend not in registry:
            raise ConfigError(f"{name}.backend = {backend!r}: no schema for this backend; known: "
                              f"{', '.join(registry)} (a new backend adds its schema to "
                              f"MODEL_SCHEMAS in pipeline/config_schema.py)")
        return registry[backend]
    hint = hints(schema).get(name)
    return hint if dataclasses.is_dataclass(hint) else None


def check_unknown(data: dict, schema: type, prefix: str, root: tuple[dict, type]) -> None:
    """Refuse the first key no schema declares; `root` = (whole config, its schema) for suggestions."""
    names = {f.name for f in dataclasses.fields(schema)}
    for k, v in data.items():
        full = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown key {full}{suggest(full, *root)}")
        sub = schema_of(schema, k, v)
        if sub is not None and isinstance(v, dict):
            check_unknown(v, sub, f"{full}.", root)
        elif _is_bool_field(schema, k) and v is not None and not isinstance(v, bool):
            raise ConfigError(f"{full} = {v!r}: expected true or false")  # omegaconf would take 3 as true


def _is_bool_field(schema: type, name: str) -> bool:
    t = hints(schema).get(name)
    return t is bool or t == typing.Optional[bool]


def valid_keys(schema: type, data: dict | None, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (the model group's keys for the selected backend)."""
    out = []
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        out.append(full)
        value = (data or {}).get(f.name)
        try:
            sub = schema_of(schema, f.name, value)
        except ConfigError:
            sub = None
        if sub is not None:
            out += valid_keys(sub, value if isinstance(value, dict) else None, f"{full}.")
    return out


def suggest(full: str, root: dict, root_schema: type) -> str:
    """' (did you mean X?)' for the closest valid key, or '' (difflib on the whole key, then on
    its last part among every key: `n` -> `synth.n`)."""
    leaf = full.rsplit(".", 1)[-1]
    section = full.rsplit(".", 1)[0] if "." in full else ""
    if section == "probe" and leaf in METHOD_PROBE_KEYS:
        return f" ({leaf} is set per method: methods.<name>.probe.{leaf}=...)"
    keys = valid_keys(root_schema, root)
    siblings = [k for k in keys if k.rsplit(".", 1)[0] == section and "." in k] if section else \
        [k for k in keys if "." not in k]
    near = difflib.get_close_matches(full, siblings, n=1, cutoff=0.6)
    if not near:
        same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
        near = same_leaf[:1] or difflib.get_close_matches(full, keys, n=1, cutoff=0.7)
    return f" (did you mean {near[0]}?)" if near else ""


# -- types ---------------------------------------------------------------------------------------
def typed_config(data: dict, schema: type) -> DictConfig:
    """omegaconf merge of the data onto the structured schema; the model group gets its backend's."""
    base = OmegaConf.structured(schema)
    rest = dict(data)
    groups = {k: rest.pop(k) for k in list(rest) if k in GROUP_FIELDS and isinstance(rest[k], dict)}
    try:
        typed = OmegaConf.merge(base, rest)
    except OmegaConfBaseException as e:
        raise ConfigError(type_message(e, schema, "", rest)) from None
    for k, v in groups.items():
        sub = schema_of(schema, k, v)
        try:
            typed[k] = OmegaConf.merge(OmegaConf.structured(sub), v)
        except OmegaConfBaseException as e:
            raise ConfigError(type_message(e, sub, f"{k}.", v)) from None
    missing = OmegaConf.missing_keys(typed)
    if missing:
        raise ConfigError(f"{sorted(missing)[0]} is required (no value given and no default in conf/*.yaml)")
    return typed


def type_message(e: OmegaConfBaseException, schema: type, prefix: str, data: dict) -> str:
    """One line from an omegaconf merge error: the key, the value, what it should be."""
    full = getattr(e, "full_key", None) or ""
    path = full.split(".") if full else []
    value: Any = data
    for p in path:
        value = value.get(p) if isinstance(value, dict) else None
    want = describe_type(field_type(schema, path)) if path else None
    if not path:  # a whole section replaced by a scalar (e.g. probe=3)
        section = next((k for k, v in data.items() if dataclasses.is_dataclass(field_type(schema, [k]))
                        and not isinstance(v, dict)), "?")
        return f"{prefix}{section} is a section of keys, got {data.get(section)!r} (set {prefix}{section}.<key>=...)"
    return f"{prefix}{full} = {value!r}: expected {want}"


def field_type(schema: type, path: list[str]):
    t: Any = schema
    for p in path:
        if not dataclasses.is_dataclass(t):
            return None
        t = hints(t).get(p)
    return t


def describe_type(t) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is typing.Union and len(args) == 1:
        return f"{names.get(args[0], args[0])} or null"
    if typing.get_origin(t) in (dict, typing.Dict):
        return "a mapping of keys"
    if typing.get_origin(t) in (list, typing.List):
        return "a list"
    return names.get(t, str(t))


# -- ranges, choices, checks -------------------------------------------------------------------------
def check_values(cfg: DictConfig, schema: type, prefix: str) -> None:
    for f in dataclasses.fields(schema):
        full, value = f"{prefix}{f.name}", cfg.get(f.name)
        sub = schema_of(schema, f.name, OmegaConf.to_container(value) if isinstance(value, DictConfig) else value)
        if sub is not None and isinstance(value, DictConfig):
            check_values(value, sub, f"{full}.")
            continue
        problem = value_problem(value, f.metadata)
        if problem:
            raise ConfigError(f"{full} = {value!r}: {problem}")


def value_problem(value: Any, meta) -> str | None:
    """What is wrong with a leaf value given its field metadata (None: nothing)."""
    if value is None or not meta:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if meta.get("check"):
        allowed = meta["check"](value)
        if allowed:
            return f"allowed: {allowed}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
        fraction = " (a fraction in [0, 1])" if (ge, le) == (0, 1) else ""
        if ge is not None and value < ge:
            return f"must be >= {ge:g}{fraction}"
        if gt is not None and value <= gt:
            return f"must be > {gt:g}"
        if le is not None and value > le:
            return f"must be <= {le:g}{fraction}"
    return None


# -- methods and storage -------------------------------------------------------------------------
def check_methods(methods: dict) -> None:
    """`methods.<name>`: a preset name or {preset, probe: {...}, refine: {...}} whose fields exist."""
    from dcam.actors.methods import PRESETS

    if not methods:
        raise ConfigError("methods is empty: name at least one method, e.g. methods.diffusion_cam.preset=diffusion_cam")
    for name, spec in methods.items():
        where = f"methods.{name}"
        spec = {"preset": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} = {spec!r}: a preset name or {{preset, probe, refine}}")
        for k in spec:
            if k not in ("preset", "probe", "refine"):
                near = difflib.get_close_matches(k, ["preset", "probe", "refine"], n=1)
                raise ConfigError(f"unknown key {where}.{k}" + (f" (did you mean {where}.{near[0]}?)" if near else ""))
        preset = spec.get("preset", "diffusion_cam")
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset = {preset!r}: must be one of {', '.join(PRESETS)}")
        if spec.get("probe"):
            _check_method_probe(where, preset, spec["probe"])
        if spec.get("refine"):
            _check_method_refine(where, preset, spec["refine"])


def _fields_or_error(where: str, section: str, given: Any, cls) -> None:
    if not isinstance(given, dict):
        raise ConfigError(f"{where}.{section} = {given!r}: expected a mapping of keys")
    known = [f.name for f in dataclasses.fields(cls)]
    for k in given:
        if k not in known:
            near = difflib.get_close_matches(k, known, n=1)
            raise ConfigError(f"unknown key {where}.{section}.{k}"
                              + (f" (did you mean {where}.{section}.{near[0]}?)" if near else ""))


def _check_method_probe(where: str, preset: str, probe: Any) -> None:
    from dcam.actors.methods import PRESETS
    from dcam.actors.probe.targets import CONTRASTS, STATES, ProbeConfig
    from dcam.actors.probe.variants import VARIANTS

    _fields_or_error(where, "probe", probe, ProbeConfig)
    for k, allowed in (("variant", tuple(VARIANTS)), ("state", STATES)):
        if k in probe and probe[k] not in allowed:
            raise ConfigError(f"{where}.probe.{k} = {probe[k]!r}: must be one of {', '.join(allowed)}")
    c = probe.get("contrast")
    if c is not None and c not in CONTRASTS and not (isinstance(c, str) and c.startswith("word:")):
        raise ConfigError(f"{where}.probe.contrast = {c!r}: must be one of {', '.join(CONTRASTS)} or word:<w>")
    if "targets" in probe and check_targets(probe["targets"]):
        raise ConfigError(f"{where}.probe.targets = {probe['targets']!r}: allowed: {check_targets(probe['targets'])}")
    _check_field_types(where, "probe", probe, ProbeConfig)
    try:
        ProbeConfig(**{**PRESETS[preset][0], **probe})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}.probe: {e}") from None


def _check_field_types(where: str, section: str, given: dict, cls) -> None:
    """Plain bool/int/float/str fields of an actors dataclass hold values of their type."""
    types = hints(cls)
    for k, v in given.items():
        t = types.get(k)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) is typing.Union and len(args) == 1:
            if v is None:
                continue
            t = args[0]
        ok = {bool: lambda x: isinstance(x, bool),
              int: lambda x: isinstance(x, int) and not isinstance(x, bool),
              float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
              str: lambda x: isinstance(x, str)}.get(t, lambda x: True)(v)
        if not ok:
            raise ConfigError(f"{where}.{section}.{k} = {v!r}: expected {describe_type(t)}")


def _check_method_refine(where: str, preset: str, refine: Any) -> None:
    from dcam.actors.methods import PRESETS
    from dcam.actors.refine import RefineConfig

    _fields_or_error(where, "refine", refine, RefineConfig)
    _check_field_types(where, "refine", refine, RefineConfig)
    try:
        RefineConfig(**{**PRESETS[preset][1], **refine})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}.refine: {e}") from None


def check_storage(storage: dict, where: str) -> None:
    """dcam's own storage keys are typed; other keys go to fsspec unless they look like a typo of ours."""
    for k, v in storage.items():
        if k not in STORAGE_KEYS:
            near = difflib.get_close_matches(k, list(STORAGE_KEYS), n=1, cutoff=0.75)
            if near:
                raise ConfigError(f"unknown key {where}.{k} (did you mean {where}.{near[0]}?); other keys are "
                                  "passed to fsspec unchanged")
            continue
        want = STORAGE_KEYS[k]
        ok = v is None or (isinstance(v, want) and not (want is int and isinstance(v, bool))) or \
            (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ConfigError(f"{where}.{k} = {v!r}: expected {describe_type(want) if want is not list else 'a list'}")
        if k == "retry_attempts" and v is not None and v < 1:
            raise ConfigError(f"{where}.{k} = {v!r}: must be >= 1")
        if k == "retry_base_delay" and v is not None and v < 0:
            raise ConfigError(f"{where}.{k} = {v!r}: must be >= 0")
