"""The fail-under gate of scheduled audits: `--fail-under obj_iou=0.3,pointing=0.8` (or
`report.fail_under` of a run) fails the command (exit 2) when a method's headline metric misses its
threshold; lower-is-better metrics (actors.schema.LOWER_BETTER) fail when above it."""
from __future__ import annotations

from dcam.actors.numeric import is_missing
from dcam.actors.schema import LOWER_BETTER
from dcam.pipeline.report.sections import FAITHFULNESS, LOCALISATION

HEADLINE_METRICS = LOCALISATION + FAITHFULNESS


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
        out[k.strip()] = float(v)
    return out


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


def parse_thresholds(spec: str | None) -> dict[str, float]:
    """--fail-under parsed and checked against the headline metric names."""
    th = parse_fail_under(spec)
    unknown = [k for k in th if k not in HEADLINE_METRICS]
    if unknown:
        raise ValueError(f"--fail-under: unknown metric(s) {unknown}; known: {', '.join(HEADLINE_METRICS)}")
    return th


def gate(summary: dict, thresholds: dict[str, float]) -> dict:
    """The --fail-under verdict: {thresholds, passed, reasons}."""
    flat = [dict(method=r["method"], refine=r["refine"], **{m: d["mean"] for m, d in r["metrics"].items()})
            for r in summary["headline"]]
    reasons = check_fail_under(flat, thresholds, lower_better=LOWER_BETTER)
    if thresholds and not flat:
        reasons = [f"no explained rows to score ({summary['rows']} result rows, {summary['ok']} ok inputs)"]
    return dict(thresholds=thresholds, passed=not reasons, reasons=reasons)
