"""The gates of scheduled audits: whatever they decide, a failed gate is exit code 2.

- fail-under: `--fail-under obj_iou=0.3,pointing=0.8` on `dcam report` (or `report.fail_under` of a
  run) fails when a method's headline metric misses its threshold; lower-is-better metrics
  (actors.schema.LOWER_BETTER, and `error_rate`) fail when above it. `error_rate` is the share of
  input rows that ended as an error row.
- error rate: `dcam run` fails when more than `report.max_error_rate` (default 0.5) of the input
  rows are errors. Why 0.5: past half, the headline means describe the minority of the corpus
  that the pipeline could read, not the corpus; below it, a few unreadable images or dead URLs
  are listed under Failures without failing the audit. 1.0 disables it; curated corpora may want
  0.01.
- grounded_rate: `--fail-under grounded_rate=0.9` fails when fewer than 90% of the explained
  content words depend on the image (image_reliance >= report.grounding_threshold;
  pipeline/report/grounding.py). It is computed by the run itself too, so it gates with the report off.
- partial runs: a fail-under gate on a run without `_SUCCESS` fails (its figures cover only the
  shards written so far) unless `--allow-partial` is given.
"""
from __future__ import annotations

from dcam.actors.numeric import is_missing
from dcam.actors.schema import LOWER_BETTER
from dcam.pipeline.report.grounding import GROUNDING_METRICS
from dcam.pipeline.report.sections import FAITHFULNESS, LOCALISATION

HEADLINE_METRICS = LOCALISATION + FAITHFULNESS + GROUNDING_METRICS
GATE_METRICS = (*HEADLINE_METRICS, "error_rate")
GATE_LOWER_BETTER = LOWER_BETTER | {"error_rate"}
DEFAULT_MAX_ERROR_RATE = 0.5


def parse_fail_under(spec: str | None) -> dict[str, float]:
    if not spec:
        return {}
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        if not v:
            raise ValueError(f"fail-under entries look like score=value, got {part!r}")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"fail-under threshold of {k.strip()!r} is not a number: {v!r}") from None
    return out


def parse_thresholds(spec: str | None) -> dict[str, float]:
    """--fail-under (or report.fail_under) parsed and checked against the gate's metric names."""
    th = parse_fail_under(spec)
    unknown = [k for k in th if k not in GATE_METRICS]
    if unknown:
        raise ValueError(f"--fail-under: unknown metric(s) {unknown}; known: {', '.join(GATE_METRICS)}")
    return th


def check_fail_under(table: list[dict], thresholds: dict[str, float], method: str | None = None,
                     lower_better=LOWER_BETTER) -> list[str]:
    """Reasons (one per missed threshold) for each method row; empty = pass. Lower-is-better
    scores (`lower_better`: deletion_auc, wrong_object, map_entropy) fail when above the threshold."""
    reasons = []
    for row in table:
        if method and row["method"] != method:
            continue
        for k, thr in thresholds.items():
            v = row.get(k)
            if is_missing(v):
                reasons.append(f"{row['method']}/{row['refine']}: {k} not measured (threshold {thr})")
            elif (v > thr) if k in lower_better else (v < thr):
                reasons.append(f"{row['method']}/{row['refine']}: {k}={v:.4f} {'>' if k in lower_better else '<'} {thr}")
    return reasons


def error_rate(inputs: int, ok: int) -> float | None:
    """Share of input rows that ended as an error row (None without input rows)."""
    return (inputs - ok) / inputs if inputs else None


def error_rate_reasons(inputs: int, ok: int, limit: float | None, name: str) -> list[str]:
    """The error-rate gate: a reason when more than `limit` of the input rows are errors."""
    rate = error_rate(inputs, ok)
    if limit is None or rate is None or rate <= limit:
        return []
    return [f"error rate {rate:.3f} ({inputs - ok} of {inputs} input rows are errors) > {name}={limit:g}"]


def metric_reasons(rows: list[dict], thresholds: dict[str, float], inputs: int, ok: int) -> list[str]:
    """fail-under reasons for per-method rows ({method, refine, metric: value}) plus error_rate."""
    th = {k: v for k, v in thresholds.items() if k != "error_rate"}
    reasons = check_fail_under(rows, th, lower_better=GATE_LOWER_BETTER)
    if th and not rows:
        reasons = [f"no explained rows to score ({inputs} input rows, {ok} ok)"]
    if "error_rate" in thresholds:
        reasons += error_rate_reasons(inputs, ok, thresholds["error_rate"], "fail-under error_rate")
    return reasons


def gate(summary: dict, thresholds: dict[str, float], allow_partial: bool = False) -> dict:
    """The --fail-under verdict of a report summary: {thresholds, passed, reasons}."""
    flat = [dict(method=r["method"], refine=r["refine"], **{m: d["mean"] for m, d in r["metrics"].items()})
            for r in summary["headline"]]
    reasons = metric_reasons(flat, thresholds, summary["inputs"], summary["ok"])
    if thresholds and not summary.get("complete", True) and not allow_partial:
        reasons.insert(0, "the run is partial (_SUCCESS is missing): its figures cover only the shards written so "
                          "far; pass --allow-partial to gate it anyway")
    return dict(thresholds=thresholds, passed=not reasons, reasons=reasons)


def run_verdict(s: dict, rep: dict, report_summary: dict | None) -> dict:
    """The gates of `dcam run`: report.max_error_rate, then report.fail_under (on the report's
    headline when the report was written, else on the run's own table)."""
    limit = rep.get("max_error_rate", DEFAULT_MAX_ERROR_RATE)
    thresholds = parse_thresholds(rep.get("fail_under"))
    reasons = error_rate_reasons(s["inputs"], s["ok"], limit, "report.max_error_rate")
    if thresholds and report_summary is not None:
        reasons += gate(report_summary, thresholds)["reasons"]
    elif thresholds:
        reasons += metric_reasons(s["table"], thresholds, s["inputs"], s["ok"])
    return dict(max_error_rate=limit, error_rate=error_rate(s["inputs"], s["ok"]), thresholds=thresholds,
                passed=not reasons, reasons=reasons)
