"""Offline validation of dcam's Kubernetes manifests.

Three layers, all offline:

1. KubeRay kinds (RayCluster, RayJob, RayCronJob) against the JSON schemas
   vendored in ``k8s/schemas`` (converted from the KubeRay v1.7.0 CRDs by
   ``k8s/schemas/build_schemas.py``), in STRICT mode: ``additionalProperties:
   false`` is added to every object schema that lists ``properties`` and is
   not marked ``x-kubernetes-preserve-unknown-fields``, so a typo such as
   ``minReplica`` fails instead of being pruned silently by the API server.
2. Built-in kinds (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap, ...)
   with ``kubernetes-validate`` (schemas bundled in the wheel; strict mode).
3. Rules the operators enforce but no schema holds (name lengths, TTL without
   shutdown, deletionRules with shutdown, cron syntax, replica bounds,
   runtimeEnvYAML a YAML mapping, no inline secrets, pinned images, ...).

Usable from pytest (``tests/k8s/test_k8s_manifests.py``) and as a script:
``python tests/k8s/k8s_checks.py k8s/*.yaml``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"

# Kubernetes minor whose built-in schemas (from kubernetes-validate) apply.
K8S_VERSION = "1.33"

RAY_GROUP = "ray.io"
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}

# Longest metadata.name each kind accepts in practice. KubeRay derives pod,
# service and job names (with suffixes) from these; the CronJob controller
# appends an 11-character suffix to Job names (63 - 11 = 52).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36, "CronJob": 52}

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# metadata fields a manifest may set (ObjectMeta minus the server-set ones).
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations",
                      "finalizers", "ownerReferences"}

# Env var names that must never carry an inline value.
SECRET_ENV = re.compile(r"^AWS_|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY",
                        re.IGNORECASE)

# RayJob.spec.submissionMode values KubeRay 1.7 accepts (the CRD has no enum).
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

POD_SPEC_CONTAINER_KEYS = ("containers", "initContainers", "ephemeralContainers")


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------

# libyaml's loader when PyYAML has it (10x faster), same safe semantics.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_documents(path: Path | str) -> list[dict]:
    """All non-empty YAML documents of a (multi-document) file."""
    text = Path(path).read_text()
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


def describe(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "<not a mapping>"
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    return f"{doc.get('kind', '?')}/{name}"


# --------------------------------------------------------------------------
# layer 1: KubeRay CRD schemas, strict
# --------------------------------------------------------------------------

_SUB_MAP = ("properties", "patternProperties", "definitions")
_SUB_LIST = ("anyOf", "allOf", "oneOf")
_SUB_ONE = ("items", "not", "additionalItems")


def strictify(schema: Any) -> Any:
    """Return a copy where every object schema that lists ``properties`` and
    is not ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false`` (unless it already says something)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SUB_MAP and isinstance(value, dict):
            out[key] = {k: strictify(v) for k, v in value.items()}
        elif key in _SUB_LIST and isinstance(value, list):
            out[key] = [strictify(v) for v in value]
        elif key in _SUB_ONE or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = strictify(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schema_path(kind: str, version: str = "v1") -> Path:
    return SCHEMA_DIR / f"{kind.lower()}.{RAY_GROUP}.{version}.json"


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, version: str = "v1", strict: bool = True) -> jsonschema.Draft7Validator:
    schema = json.loads(schema_path(kind, version).read_text())
    if strict:
        schema = strictify(schema)
    return jsonschema.Draft7Validator(schema)  # check_schema: see test_vendored_schema_is_draft07


def _json_path(error: jsonschema.ValidationError) -> str:
    return _format_path(error.absolute_path)


def _format_path(path) -> str:
    parts: list[str] = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "<root>"


def crd_schema_errors(doc: dict, strict: bool = True) -> list[str]:
    api = doc.get("apiVersion", "")
    version = api.split("/", 1)[1] if "/" in api else "v1"
    path = schema_path(doc["kind"], version)
    if not path.exists():
        return [f"schema: no vendored schema for {doc['kind']} {api} ({path.name})"]
    validator = crd_validator(doc["kind"], version, strict)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"schema: {_json_path(e)}: {e.message}" for e in errors]


# --------------------------------------------------------------------------
# layer 2: built-in kinds via kubernetes-validate
# --------------------------------------------------------------------------

def builtin_schema_errors(doc: dict) -> list[str]:
    import kubernetes_validate  # imported lazily: only needed for built-in kinds
    from kubernetes_validate.utils import VersionNotSupportedError

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = _format_path(e.path)
        return [f"schema: {where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"schema: {e.message}"]
    except VersionNotSupportedError:
        return [f"schema: kubernetes-validate {getattr(kubernetes_validate, '__version__', '?')} has no "
                f"schemas for Kubernetes {K8S_VERSION}; install kubernetes-validate>={K8S_VERSION}"]
    return []


# --------------------------------------------------------------------------
# layer 3: operator rules
# --------------------------------------------------------------------------

CRON_FIELDS = [  # (name, low, high, names)
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]),
    ("day-of-week", 0, 6, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]),
]
CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_errors(expr: Any) -> list[str]:
    """Validate a standard 5-field cron expression (the robfig/cron "standard"
    parser used by Kubernetes and KubeRay): numbers, names, *, ?, ranges,
    steps and lists."""
    if not isinstance(expr, str) or not expr.strip():
        return ["cron: schedule must be a non-empty string"]
    expr = expr.strip()
    if expr.startswith(("TZ=", "CRON_TZ=")):
        return ["cron: TZ=/CRON_TZ= in the schedule is not allowed; use spec.timeZone"]
    if expr.startswith("@"):
        return [] if expr in CRON_MACROS else [f"cron: unknown macro {expr!r}"]
    fields = expr.split()
    if len(fields) != 5:
        return [f"cron: {expr!r} has {len(fields)} fields, expected 5 "
                "(minute hour day-of-month month day-of-week)"]
    errors = []
    for text, (fname, low, high, names) in zip(fields, CRON_FIELDS):
        def value(token: str) -> int:
            if names and token.upper() in names:
                return names.index(token.upper()) + (low if fname == "month" else 0)
            if not token.isdigit():
                raise ValueError(f"{token!r} is not a number")
            v = int(token)
            if not low <= v <= high:
                raise ValueError(f"{v} out of range {low}-{high}")
            return v

        for part in text.split(","):
            try:
                rng, _, step = part.partition("/")
                if step and (not step.isdigit() or int(step) < 1):
                    raise ValueError(f"step {step!r} must be a positive integer")
                if rng in ("*", "?"):
                    if rng == "?" and fname not in ("day-of-month", "day-of-week"):
                        raise ValueError("'?' is only allowed in day-of-month and day-of-week")
                    continue
                if "-" in rng:
                    a, _, b = rng.partition("-")
                    lo, hi = value(a), value(b)
                    if lo > hi:
                        raise ValueError(f"range {rng!r} is reversed")
                else:
                    value(rng)
            except ValueError as exc:
                errors.append(f"cron: {fname} field {text!r}: {exc}")
    return errors


def time_zone_errors(tz: Any) -> list[str]:
    if tz is None:
        return []
    try:
        import zoneinfo
        zoneinfo.ZoneInfo(tz)
    except Exception:  # ZoneInfoNotFoundError, ValueError, missing tz database
        try:
            import zoneinfo
            if not zoneinfo.available_timezones():
                return []  # no tz database on this machine: cannot judge
        except (ImportError, OSError):
            return []
        return [f"timeZone: {tz!r} is not an IANA time zone"]
    return []


def name_errors(doc: dict) -> list[str]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing"]
    errors = []
    unknown = sorted(set(meta) - OBJECT_META_FIELDS)
    if unknown:
        errors.append(f"metadata: unknown or server-set field(s) {unknown}")
    for key in ("labels", "annotations"):
        if key in meta and not (isinstance(meta[key], dict)
                                and all(isinstance(v, str) for v in meta[key].values())):
            errors.append(f"metadata.{key}: values must be strings")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return errors + ["metadata.name: missing"]
    kind = doc.get("kind")
    limit = NAME_LIMITS.get(kind)
    if limit is not None:
        if len(name) > limit:
            errors.append(f"metadata.name: {name!r} is {len(name)} characters; "
                          f"{kind} names must be at most {limit}")
        if not DNS1123_LABEL.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    return errors


def iter_pod_specs(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Yield (path, pod spec) for every mapping that has a containers list."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path or "<root>", node
        for key, value in node.items():
            yield from iter_pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_pod_specs(value, f"{path}[{i}]")


def image_errors(image: Any, where: str) -> list[str]:
    if not isinstance(image, str) or not image:
        return [f"{where}: image missing"]
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{where}: image {image!r} is not pinned (no tag or digest)"]
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or not tag:
        return [f"{where}: image {image!r} is not pinned (:latest)"]
    return []


def container_errors(pod_path: str, pod: dict) -> list[str]:
    errors = []
    for key in POD_SPEC_CONTAINER_KEYS:
        for i, c in enumerate(pod.get(key) or []):
            if not isinstance(c, dict):
                continue
            where = f"{pod_path}.{key}[{i}]({c.get('name', '?')})"
            errors += image_errors(c.get("image"), where)
            for env in c.get("env") or []:
                if not isinstance(env, dict):
                    continue
                name = str(env.get("name", ""))
                if SECRET_ENV.search(name) and "valueFrom" not in env:
                    errors.append(f"{where}.env.{name}: inline value for a secret-like variable; "
                                  "use valueFrom.secretKeyRef")
                elif SECRET_ENV.search(name) and "value" in env:
                    errors.append(f"{where}.env.{name}: both value and valueFrom")
            resources = c.get("resources") or {}
            limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
            for res in set(limits) | set(requests):
                if "/" in res and res in requests and res in limits and str(requests[res]) != str(limits[res]):
                    errors.append(f"{where}.resources: extended resource {res} needs requests == limits")
            for res in ("cpu", "memory"):
                if res in limits and res in requests:
                    try:
                        if parse_quantity(requests[res]) > parse_quantity(limits[res]):
                            errors.append(f"{where}.resources: {res} request {requests[res]} "
                                          f"exceeds limit {limits[res]}")
                    except ValueError as exc:
                        errors.append(f"{where}.resources.{res}: {exc}")
    return errors


_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(q: Any) -> float:
    m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+))?([a-zA-Z]*)", str(q).strip())
    if not m or m.group(3) not in _SUFFIX:
        raise ValueError(f"{q!r} is not a Kubernetes quantity")
    value = float(m.group(1)) * _SUFFIX[m.group(3)]
    return value * (10 ** int(m.group(2))) if m.group(2) else value


def ray_cluster_spec_errors(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return []
    errors = []
    seen = set()
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        gname = group.get("groupName", f"#{i}")
        gwhere = f"{where}.workerGroupSpecs[{i}]({gname})"
        if gname in seen:
            errors.append(f"{gwhere}: duplicate groupName {gname!r}")
        seen.add(gname)
        lo = group.get("minReplicas", 0)
        hi = group.get("maxReplicas", 2**31 - 1)
        n = group.get("replicas", lo)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, n, hi)):
            if not lo <= n <= hi:
                errors.append(f"{gwhere}: needs minReplicas <= replicas <= maxReplicas "
                              f"(got {lo} <= {n} <= {hi})")
    for key, value in (spec.get("headGroupSpec") or {}).get("rayStartParams", {}).items():
        if not isinstance(value, str):
            errors.append(f"{where}.headGroupSpec.rayStartParams.{key}: must be a string")
    return errors


def runtime_env_errors(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        return [f"{where}.runtimeEnvYAML: must be a YAML string, not a {type(value).__name__}"]
    try:
        parsed = yaml_load(value)
    except yaml.YAMLError as exc:
        return [f"{where}.runtimeEnvYAML: is not valid YAML ({exc.__class__.__name__})"]
    if not isinstance(parsed, dict):
        return [f"{where}.runtimeEnvYAML: must parse to a YAML mapping, got {type(parsed).__name__}"]
    errors = []
    env_vars = parsed.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        errors.append(f"{where}.runtimeEnvYAML: env_vars must be a mapping")
    else:
        for name in env_vars:
            if SECRET_ENV.search(str(name)):
                errors.append(f"{where}.runtimeEnvYAML: env_vars.{name}: inline value for a "
                              "secret-like variable; put it in a Secret and use valueFrom")
    return errors


def ray_job_spec_errors(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return []
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    if "ttlSecondsAfterFinished" in spec and not shutdown:
        errors.append(f"{where}: ttlSecondsAfterFinished requires shutdownAfterJobFinishes: true")
    strategy = spec.get("deletionStrategy")
    if isinstance(strategy, dict):
        rules = strategy.get("deletionRules")
        legacy = [k for k in ("onSuccess", "onFailure") if k in strategy]
        if rules is not None and shutdown:
            errors.append(f"{where}: deletionStrategy.deletionRules cannot be combined with "
                          "shutdownAfterJobFinishes: true (use one cleanup mechanism)")
        if rules is not None and legacy:
            errors.append(f"{where}: deletionStrategy: onSuccess/onFailure cannot be combined "
                          "with deletionRules")
        if rules is None and len(legacy) != 2:
            errors.append(f"{where}: deletionStrategy needs deletionRules, or both onSuccess "
                          "and onFailure")
        for i, rule in enumerate(rules or []):
            cond = (rule or {}).get("condition") or {}
            if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
                errors.append(f"{where}: deletionStrategy.deletionRules[{i}].condition needs "
                              "exactly one of jobStatus and jobDeploymentStatus")
    if "clusterSelector" in spec and shutdown:
        errors.append(f"{where}: shutdownAfterJobFinishes cannot be used with clusterSelector")
    if "clusterSelector" not in spec and "rayClusterSpec" not in spec:
        errors.append(f"{where}: needs rayClusterSpec (or clusterSelector)")
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        errors.append(f"{where}: activeDeadlineSeconds must be positive")
    if isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] < 0:
        errors.append(f"{where}: backoffLimit must be >= 0")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}: submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
    entrypoint = spec.get("entrypoint")
    if mode != "InteractiveMode":
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            errors.append(f"{where}: entrypoint is required")
    if isinstance(entrypoint, str) and re.search(r"AWS_SECRET_ACCESS_KEY=|AWS_SESSION_TOKEN=|"
                                                 r"RAY_AUTH_TOKEN=", entrypoint):
        errors.append(f"{where}: entrypoint sets a credential inline")
    errors += runtime_env_errors(spec.get("runtimeEnvYAML"), where)
    errors += ray_cluster_spec_errors(spec.get("rayClusterSpec"), f"{where}.rayClusterSpec")
    return errors


def rbac_errors(doc: dict) -> list[str]:
    errors = []
    for i, rule in enumerate(doc.get("rules") or []):
        for field in ("verbs", "resources", "apiGroups"):
            if "*" in (rule.get(field) or []):
                errors.append(f"rules[{i}].{field}: wildcard '*' is not least privilege")
        if "secrets" in (rule.get("resources") or []):
            errors.append(f"rules[{i}]: access to secrets is not needed by dcam")
    return errors


def rule_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    spec = doc.get("spec")
    errors = name_errors(doc)
    if kind == "RayCluster":
        errors += ray_cluster_spec_errors(spec, "spec")
    elif kind == "RayJob":
        errors += ray_job_spec_errors(spec, "spec")
    elif kind == "RayCronJob" and isinstance(spec, dict):
        errors += cron_errors(spec.get("schedule"))
        errors += time_zone_errors(spec.get("timeZone"))
        errors += ray_job_spec_errors(spec.get("jobTemplate"), "spec.jobTemplate")
    elif kind == "CronJob" and isinstance(spec, dict):
        errors += cron_errors(spec.get("schedule"))
        errors += time_zone_errors(spec.get("timeZone"))
    elif kind in ("Role", "ClusterRole"):
        errors += rbac_errors(doc)
    elif kind == "Secret" and (doc.get("data") or doc.get("stringData")):
        errors.append("Secret with inline data: create Secrets out of band, never commit values")
    for pod_path, pod in iter_pod_specs(spec):
        errors += container_errors(f"spec.{pod_path}" if pod_path != "<root>" else "spec", pod)
    return errors


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------

def check_document(doc: Any, strict: bool = True) -> list[str]:
    """All problems of one manifest document, as readable strings."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return ["document: not a Kubernetes object (needs apiVersion and kind)"]
    api = doc["apiVersion"]
    if api.split("/")[0] == RAY_GROUP:
        errors = crd_schema_errors(doc, strict=strict)
    else:
        errors = builtin_schema_errors(doc)
    return errors + rule_errors(doc)


def check_documents(docs: list, strict: bool = True) -> list[str]:
    out = []
    for i, doc in enumerate(docs):
        out += [f"doc {i} {describe(doc)}: {e}" for e in check_document(doc, strict=strict)]
    return out


def check_file(path: Path | str, strict: bool = True) -> list[str]:
    try:
        docs = load_documents(path)
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    return [f"{path}: {e}" for e in check_documents(docs, strict=strict)]


def render_template(text: str, values: dict[str, str]) -> str:
    """Fill ``__NAME__`` placeholders like the CronJob runner does."""
    for key, value in values.items():
        text = text.replace(f"__{key}__", value)
    return text


def manifest_files(root: Path = K8S_DIR) -> list[Path]:
    """Every Kubernetes manifest under k8s/ (kustomization files excluded)."""
    return sorted(p for p in root.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and "schemas" not in p.parts)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or manifest_files()
    problems = []
    for p in paths:
        problems += check_file(p)
    for line in problems:
        print(line)
    print(f"{len(paths)} file(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["check_document", "check_documents", "check_file", "cron_errors", "strictify",
           "load_documents", "yaml_load", "render_template", "manifest_files", "crd_validator"]
