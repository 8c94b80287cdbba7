#!/usr/bin/env python3
"""Convert a KubeRay CustomResourceDefinition into a JSON Schema (draft-07).

Usage (from the repository root; the CRD files come from a KubeRay release,
e.g. ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of v1.7.0)::

    python k8s/schemas/build_schemas.py PATH/TO/ray.io_rayclusters.yaml \
        PATH/TO/ray.io_rayjobs.yaml PATH/TO/ray.io_raycronjobs.yaml \
        --kuberay-version v1.7.0 --out-dir k8s/schemas

For every CRD it writes ``<kind>.<group>.<version>.json`` (lower-case kind),
e.g. ``rayjob.ray.io.v1.json``. Only the served storage version (``v1``
unless ``--api-version`` says otherwise) is kept, and ``.status`` is dropped:
manifests never carry a status, so the vendored files stay small.

OpenAPI v3 (Kubernetes structural schema) -> draft-07:

* ``nullable: true``              -> ``type: [T, "null"]``
* boolean ``exclusiveMinimum``/``exclusiveMaximum`` -> draft-07 numbers
* ``format: int32`` / ``int64``   -> explicit ``minimum``/``maximum`` bounds
  (draft-07 has no such formats; the API server rejects overflows)
* ``x-kubernetes-list-type: set`` -> ``uniqueItems: true``
* ``x-kubernetes-validations`` (CEL), ``x-kubernetes-list-type``,
  ``x-kubernetes-list-map-keys``, ``x-kubernetes-map-type`` and
  ``x-kubernetes-int-or-string`` are dropped (int-or-string is already
  spelled as ``anyOf: [integer, string]`` by controller-gen). The CEL rules
  that matter for dcam's manifests are re-implemented as plain Python
  checks in ``tests/k8s/k8s_checks.py``.
* identical sub-schemas of at least 4 KiB that occur more than once (the
  Pod template: head group, worker groups, submitter) are hoisted into
  ``definitions`` and referenced with ``$ref``, roughly halving the files.
* ``x-kubernetes-preserve-unknown-fields`` and
  ``x-kubernetes-embedded-resource`` are KEPT as inert annotations: the
  strict validator in ``tests/k8s/k8s_checks.py`` reads them to decide where
  ``additionalProperties: false`` may be added.

The converter is deliberately dependency-light: PyYAML only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DRAFT07 = "http://json-schema.org/draft-07/schema#"
CONVERTER_VERSION = 1

INT_BOUNDS = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}

# x-kubernetes-* keys that are kept (inert for validators, read by the strict mode).
KEEP_X_KEYS = {"x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource"}

# Keywords whose value is a single sub-schema / a list of sub-schemas /
# a mapping name -> sub-schema.
_SUBSCHEMA = {"items", "not", "additionalItems"}
_SUBSCHEMA_LIST = {"anyOf", "allOf", "oneOf"}
_SUBSCHEMA_MAP = {"properties", "patternProperties", "definitions"}


def convert_schema(node: Any) -> Any:
    """Convert one OpenAPI v3 schema node (recursively) to draft-07."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SUBSCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: convert_schema(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            out[key] = [convert_schema(sub) for sub in value]
        elif key in _SUBSCHEMA or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = convert_schema(value)
        elif key == "description":
            continue  # KubeRay's CRDs ship without descriptions; keep the files small anyway
        elif key.startswith("x-kubernetes-"):
            if key in KEEP_X_KEYS:
                out[key] = value
            elif key == "x-kubernetes-list-type" and value == "set":
                out["uniqueItems"] = True
            # everything else (validations/CEL, list-map-keys, map-type, int-or-string) is dropped
        elif key in ("nullable", "exclusiveMinimum", "exclusiveMaximum", "format"):
            continue  # handled below
        else:
            out[key] = value

    if node.get("nullable") is True:
        typ = out.get("type")
        if isinstance(typ, str):
            out["type"] = [typ, "null"]
        elif isinstance(typ, list) and "null" not in typ:
            out["type"] = typ + ["null"]
        elif "enum" in out and None not in out["enum"]:
            out["enum"] = list(out["enum"]) + [None]

    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = node.get(bound)
        if flag is True and limit in out:
            out[bound] = out.pop(limit)
        elif isinstance(flag, (int, float)) and not isinstance(flag, bool):
            out[bound] = flag

    fmt = node.get("format")
    if fmt in INT_BOUNDS:
        lo, hi = INT_BOUNDS[fmt]
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = lo
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = hi
    elif fmt is not None:
        out["format"] = fmt  # date-time, byte, ...: informational in draft-07
    return out


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _definition_name(node: dict, digest: str) -> str:
    props = node.get("properties", {})
    spec = props.get("spec", {}).get("properties", {})
    if set(props) == {"metadata", "spec"} and "containers" in spec:
        return "PodTemplateSpec"
    return f"shared-{digest[:10]}"


def hoist_duplicates(schema: dict, min_size: int = 4096) -> dict:
    """Move repeated large sub-schemas into ``definitions`` and ``$ref`` them.

    Greedy, largest first; only schema positions are considered (values of
    ``properties``/``items``/``additionalProperties``/``*Of``), never keyword
    values such as ``enum``.
    """
    definitions: dict[str, Any] = dict(schema.get("definitions", {}))

    def positions(node: Any, out: list) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in _SUBSCHEMA_MAP and isinstance(value, dict) and key != "definitions":
                for sub in value.values():
                    if isinstance(sub, dict):
                        out.append(sub)
                        positions(sub, out)
            elif key in _SUBSCHEMA_LIST and isinstance(value, list):
                for sub in value:
                    if isinstance(sub, dict):
                        out.append(sub)
                        positions(sub, out)
            elif (key in _SUBSCHEMA or key == "additionalProperties") and isinstance(value, dict):
                out.append(value)
                positions(value, out)

    def replace(node: Any, target: str, ref: dict) -> Any:
        if not isinstance(node, dict):
            return node
        new: dict[str, Any] = {}
        for key, value in node.items():
            if key in _SUBSCHEMA_MAP and isinstance(value, dict) and key != "definitions":
                new[key] = {n: (ref if isinstance(s, dict) and _canonical(s) == target
                                else replace(s, target, ref)) for n, s in value.items()}
            elif key in _SUBSCHEMA_LIST and isinstance(value, list):
                new[key] = [ref if isinstance(s, dict) and _canonical(s) == target
                            else replace(s, target, ref) for s in value]
            elif (key in _SUBSCHEMA or key == "additionalProperties") and isinstance(value, dict):
                new[key] = ref if _canonical(value) == target else replace(value, target, ref)
            else:
                new[key] = value
        return new

    while True:
        counts: dict[str, int] = {}
        for sub in positions_list(schema, positions):
            text = _canonical(sub)
            if len(text) >= min_size:
                counts[text] = counts.get(text, 0) + 1
        repeated = [t for t, n in counts.items() if n > 1]
        if not repeated:
            break
        target = max(repeated, key=len)
        node = json.loads(target)
        name = _definition_name(node, hashlib.sha256(target.encode()).hexdigest())
        definitions[name] = node
        schema = replace(schema, target, {"$ref": f"#/definitions/{name}"})
    if definitions:
        schema["definitions"] = definitions
    return schema


def positions_list(schema: dict, walker) -> list:
    out: list = []
    walker(schema, out)
    return out


def schema_from_crd(crd: dict, api_version: str | None, keep_status: bool,
                    source_name: str, source_sha256: str, kuberay_version: str,
                    dedup: bool = True) -> tuple[str, dict]:
    """Return (file name, draft-07 schema) for one CRD document."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{source_name}: not a CustomResourceDefinition (kind={crd.get('kind')!r})")
    spec = crd["spec"]
    group = spec["group"]
    kind = spec["names"]["kind"]
    versions = spec["versions"]
    if api_version is None:
        chosen = [v for v in versions if v.get("storage")]
    else:
        chosen = [v for v in versions if v["name"] == api_version]
    if len(chosen) != 1:
        names = [v["name"] for v in versions]
        raise ValueError(f"{source_name}: cannot pick one version of {kind} from {names}")
    version = chosen[0]
    openapi = version["schema"]["openAPIV3Schema"]
    if not keep_status:
        openapi = dict(openapi)
        openapi["properties"] = {k: v for k, v in openapi["properties"].items() if k != "status"}
    body = convert_schema(openapi)
    # Pin apiVersion and kind: the file validates exactly one resource type.
    body["properties"]["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
    body["properties"]["kind"] = {"type": "string", "enum": [kind]}
    body["required"] = sorted(set(body.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    if dedup:
        body = hoist_duplicates(body)
    schema = {
        "$schema": DRAFT07,
        "$id": f"https://dcam.invalid/schemas/{kind.lower()}.{group}.{version['name']}.json",
        "title": f"{kind} ({group}/{version['name']}), KubeRay {kuberay_version}",
        "x-dcam-source": {
            "project": "KubeRay (ray-project/kuberay)",
            "kuberay_version": kuberay_version,
            "license": "Apache-2.0",
            "crd": source_name,
            "crd_sha256": source_sha256,
            "api_version": f"{group}/{version['name']}",
            "status_kept": keep_status,
            "converter": f"k8s/schemas/build_schemas.py v{CONVERTER_VERSION}",
            "deduplicated": dedup,
        },
        **body,
    }
    return f"{kind.lower()}.{group}.{version['name']}.json", schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crds", nargs="+", type=Path, help="CRD YAML file(s) from a KubeRay release")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--kuberay-version", default="v1.7.0")
    parser.add_argument("--api-version", default=None,
                        help="version to keep (default: the CRD's storage version)")
    parser.add_argument("--keep-status", action="store_true", help="keep .status (larger files)")
    parser.add_argument("--no-dedup", action="store_true",
                        help="do not hoist repeated sub-schemas into definitions")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.crds:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        docs = [d for d in yaml.safe_load_all(raw) if d]
        for crd in docs:
            name, schema = schema_from_crd(crd, args.api_version, args.keep_status,
                                           path.name, digest, args.kuberay_version,
                                           dedup=not args.no_dedup)
            target = args.out_dir / name
            text = json.dumps(schema, indent=1, sort_keys=True) + "\n"
            target.write_text(text)
            print(f"{path.name} -> {target} ({len(text) / 1024:.0f} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
