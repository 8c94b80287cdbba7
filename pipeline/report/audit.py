"""The report's audit trail: what exactly was audited, so a reader can trust (or question) the figures.

- responses: whether the explained text was the model's own answer (`generated`) or a given
  caption (`given`, from the input's response field): a corpus with captions audits the captions;
- method settings: per (method, refine) the attribution state and hook read from the rows, and
  the preset, map variant and contrast from the run's stored config (config.json);
- inputs: rows and shards the manifest expected vs the inputs present in the results;
- versions: the dcam that wrote the run (config.json) and the one that wrote the report;
- the resolved config itself (credentials redacted when it was stored).
"""
from __future__ import annotations

from dcam import __version__


def responses(scan) -> dict:
    """{generated, given, other, verdict} over ok input samples."""
    r = dict(scan.responses)
    generated, given = r.pop("generated", 0), r.pop("given", 0)
    other = sum(r.values())
    if given and not generated:
        verdict = "given captions (the maps explain the input's captions, not the model's answers)"
    elif generated and not given:
        verdict = "the model's own answers"
    elif generated or given:
        verdict = f"mixed: {generated} samples with the model's answers, {given} with given captions"
    else:
        verdict = "no explained samples"
    return dict(generated=generated, given=given, other=other, verdict=verdict)


def _method_spec(methods_cfg: dict, name: str) -> tuple[str | None, dict, dict]:
    """(preset, probe fields, refine overrides) of a method from the stored config."""
    from dcam.actors.methods import PRESETS

    spec = methods_cfg.get(name)
    if spec is None:
        return None, {}, {}
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    preset = spec.get("preset", "diffusion_cam")
    base = PRESETS.get(preset, ({}, {}))[0]
    return preset, {**base, **(spec.get("probe") or {})}, dict(spec.get("refine") or {})


def method_settings(scan, run_config: dict | None) -> list[dict]:
    """One row per (method, refine): state and hook from the rows; preset, variant, contrast and
    refine overrides from the stored config (None when the run has no config.json)."""
    methods_cfg = ((run_config or {}).get("config") or {}).get("methods") or {}
    grouped: dict[tuple, dict] = {}
    for method, refine, hook, state in sorted(scan.settings, key=lambda t: tuple(str(x) for x in t)):
        g = grouped.setdefault((method, refine), dict(hooks=[], states=[]))
        if hook not in g["hooks"]:
            g["hooks"].append(hook)
        if state not in g["states"]:
            g["states"].append(state)
    rows = []
    for (method, refine), g in grouped.items():
        preset, probe, refine_over = _method_spec(methods_cfg, method)
        rows.append(dict(method=method, preset=preset, state=", ".join(map(str, g["states"])),
                         hook=", ".join(map(str, g["hooks"])), variant=probe.get("variant"),
                         contrast=probe.get("contrast"), refinement=refine,
                         refine_settings=", ".join(f"{k}={v}" for k, v in sorted(refine_over.items())) or None))
    return rows


def inputs(info: dict, present_inputs: int, files: int) -> dict:
    """Expected (manifest) vs present (results) input rows and shards."""
    m = info.get("manifest") or {}
    expected = m.get("total_rows")
    return dict(expected_rows=expected, present_rows=present_inputs, expected_shards=m.get("shards"),
                result_files=files, complete=info.get("complete"),
                match=None if expected is None else expected == present_inputs)


def audit_trail(scan, info: dict, run_config: dict | None, present_inputs: int, files: int) -> dict:
    """The summary's `audit` section."""
    return dict(report_dcam_version=__version__, run_dcam_version=(run_config or {}).get("dcam_version"),
                config_hash=(run_config or {}).get("config_hash"), responses=responses(scan),
                methods=method_settings(scan, run_config), inputs=inputs(info, present_inputs, files),
                config=(run_config or {}).get("config"))


def audit_warnings(a: dict) -> list[str]:
    """Caveats the audit trail raises (shown on top of the report)."""
    w = []
    r, i = a["responses"], a["inputs"]
    if r["given"]:
        w.append(f"{r['given']} of {r['given'] + r['generated']} samples were explained on given captions "
                 "(the input's response field), not on the model's own answers.")
    if i["match"] is False:
        w.append(f"The manifest expects {i['expected_rows']} input rows; the results hold {i['present_rows']}.")
    if a["config"] is None:
        w.append("No config.json in the run directory (a run made by an older dcam): method settings beyond "
                 "state and hook are not recorded.")
    return w
