"""End of a run: counts by status and reason, the accounting (input rows the manifest expects vs
present in final files), throughput, the localisation table (when masks exist), summary.json, then
the report and the fail-under gate.

summary.json keeps the audit's results apart from its report: `results_status` ("complete": every
input row is in a final file and _SUCCESS is written) and `report_status` ("ok", "failed" with
`report_error`, or "disabled"). A report that fails after complete results does not fail the
audit as a whole: the job exits EXIT_REPORT_FAILED (3) and says so; the gate (exit 2) still runs
on the results."""
from __future__ import annotations

import json
import math

import numpy as np

from dcam import __version__
from dcam.actors.numeric import finite_or_none
from dcam.actors.schema import FAITHFULNESS_SCORES, TABLE_SCORES
from dcam.pipeline.console import format_table
from dcam.pipeline.layout import RunDir
from dcam.pipeline.report.build import generate_report
from dcam.pipeline.report.gate import run_verdict
from dcam.pipeline.report.grounding import DEFAULT_GROUNDING_THRESHOLD, GROUNDING_METRICS, grounding_columns
from dcam.pipeline.storage import describe_error, secrets_of

EXIT_GATE_FAILED = 2
EXIT_REPORT_FAILED = 3


class AccountingError(RuntimeError):
    """The final files' rows disagree with the manifest: the run is not complete, whatever it says."""


def iter_result_files(run: RunDir, columns: list[str]):
    """The run's final files one at a time (only `columns`): memory bounded by the largest shard,
    not by the run (reading them as one table held every output row in the driver)."""
    from dcam.pipeline.compaction import read_columns

    sizes = run.sizes("results")  # a fresh listing (s3fs caches listings: this driver wrote them)
    for name in sorted(sizes):
        if name.endswith(".parquet") and not name.startswith(("_", ".")):  # not .tmp, not dot files
            yield read_columns(run, run.path("results", name), columns, sizes[name], fill_missing=True)


class ResultsTally:
    """Status counts, the per-(method, refine) score table (TABLE_SCORES and the grounding metrics of
    content words at `grounding_threshold`) and corpus-level faithfulness, accumulated file by file.
    A final file holds one input shard, so an input row (shard, row_index) never spans two files
    and per-file distinct rows add up to the run's. State: a few sums per (method, refine)."""

    def __init__(self, grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD):
        self.threshold = float(grounding_threshold)
        self.inputs, self.ok, self.errors = 0, 0, {}
        self.scores: dict[tuple, dict] = {}  # (method, refine) -> rows, and per metric [sum, count]
        self.faith: dict[tuple, dict] = {}  # (method, refine) -> words, sampled, per AUC [sum, sum sq, count]

    def add(self, t) -> None:
        c = status_counts(t)
        self.inputs += c["inputs"]
        self.ok += c["ok"]
        for k, n in c["errors"].items():
            self.errors[k] = self.errors.get(k, 0) + n
        import pyarrow.compute as pc

        ok = t.filter(pc.and_(pc.fill_null(pc.equal(t["status"], "ok"), False), pc.is_valid(t["method"])))
        for method, refine in sorted({(m, r) for m, r in zip(ok["method"].to_pylist(), ok["refine"].to_pylist())},
                                     key=str):
            sel = ok.filter(pc.and_(pc.equal(ok["method"], method), pc.equal(ok["refine"], refine)))
            self._add_scores((method, refine), sel)
            self._add_faithfulness((method, refine), sel)

    def _add_scores(self, key: tuple, sel) -> None:
        acc = self.scores.setdefault(key, dict(rows=0, **{k: [0.0, 0] for k in (*TABLE_SCORES, *GROUNDING_METRICS)}))
        acc["rows"] += sel.num_rows
        values = {k: sel[k].to_numpy(zero_copy_only=False).astype(float) for k in TABLE_SCORES}
        rel = _column(sel, "image_reliance").to_numpy(zero_copy_only=False).astype(float)
        values.update(zip(GROUNDING_METRICS, grounding_columns(rel, _column(sel, "word_type"), self.threshold).T))
        for k, v in values.items():
            v = v[~np.isnan(v)]
            acc[k][0] += float(v.sum())
            acc[k][1] += int(v.size)

    def _add_faithfulness(self, key: tuple, sel) -> None:
        acc = self.faith.setdefault(key, dict(words=0, sampled=0, **{k: [0.0, 0.0, 0] for k in FAITHFULNESS_SCORES}))
        acc["words"] += sel.num_rows
        acc["sampled"] += sum(1 for v in _column(sel, "faithfulness_sampled").to_pylist() if v)
        for k in FAITHFULNESS_SCORES:
            v = sel[k].to_numpy(zero_copy_only=False).astype(float)
            v = v[~np.isnan(v)]
            acc[k][0] += float(v.sum())
            acc[k][1] += float((v * v).sum())
            acc[k][2] += int(v.size)

    def table(self) -> list[dict]:
        """Mean of each score per (method, refine) over ok rows that have the score."""
        out = []
        for (method, refine), acc in sorted(self.scores.items(), key=str):
            row = dict(method=method, refine=refine, rows=acc["rows"])
            for k in (*TABLE_SCORES, *GROUNDING_METRICS):
                total, n = acc[k]
                row[k] = finite_or_none(total / n) if n else None
                row[f"{k}_n"] = n
            out.append(row)
        return out

    def faithfulness(self) -> list[dict]:
        """Per (method, refine): `words` rows, of which `sampled` had curves measured
        (probe.faithfulness_sample), and per AUC {mean, lo, hi, n}: the mean over the rows with a
        value and its normal 95% interval (actors.numeric.mean_interval, from running sums). Rows
        outside the sample hold nulls and are left out of n, the mean and the interval."""
        out = []
        for (method, refine), acc in sorted(self.faith.items(), key=str):
            row = dict(method=method, refine=refine, words=acc["words"], sampled=acc["sampled"])
            for k in FAITHFULNESS_SCORES:
                row[k] = interval_from_sums(*acc[k])
            out.append(row)
        return out


def _column(t, name: str):
    """A column of `t`, or all-null of its schema type when `t` lacks it (an older file or a table
    built without it)."""
    import pyarrow as pa

    from dcam.pipeline.sinks import SCHEMA

    return t[name] if name in t.column_names else pa.nulls(t.num_rows, SCHEMA.field(name).type)


def interval_from_sums(total: float, total_sq: float, n: int, z: float = 1.959963984540054) -> dict:
    """mean_interval's {mean, lo, hi, n} from the sum, the sum of squares and the count."""
    if n == 0:
        return dict(mean=None, lo=None, hi=None, n=0)
    mean = total / n
    if n < 2:
        return dict(mean=mean, lo=None, hi=None, n=n)
    half = z * math.sqrt(max(total_sq - n * mean * mean, 0.0) / (n - 1)) / math.sqrt(n)
    return dict(mean=mean, lo=mean - half, hi=mean + half, n=n)


def localisation_table(t, grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD) -> list[dict]:
    """The score table of one results table (ResultsTally.table)."""
    tally = ResultsTally(grounding_threshold)
    tally.add(t)
    return tally.table()


def faithfulness_table(t) -> list[dict]:
    """Corpus-level faithfulness of one results table (ResultsTally.faithfulness)."""
    tally = ResultsTally()
    tally.add(t)
    return tally.faithfulness()


def status_counts(t) -> dict:
    """Per input row (shard, row_index): ok, or error by reason."""
    rows = {}
    for shard, ri, st, kind in zip(t["shard"].to_pylist(), t["row_index"].to_pylist(), t["status"].to_pylist(),
                                   t["error_kind"].to_pylist()):
        rows.setdefault((shard, ri), (st, kind))
    errors: dict[str, int] = {}
    for st, kind in rows.values():
        if st != "ok":
            errors[kind or "error"] = errors.get(kind or "error", 0) + 1
    return dict(inputs=len(rows), ok=sum(1 for st, _ in rows.values() if st == "ok"), errors=errors)


def previous_results(run: RunDir, cfg_hash: str, acct: dict,
                     grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD) -> dict | None:
    """inputs, ok, errors and tables of the run's complete summary.json for this config, this
    accounting and this grounding threshold, else None."""
    if not run.exists("summary.json"):
        return None
    try:
        old = json.loads(run.read_text("summary.json"))
    except ValueError:
        return None
    same = (old.get("results_status") == "complete" and old.get("config_hash") == cfg_hash
            and all((old.get("accounting") or {}).get(k) == acct[k] for k in ("expected_inputs", "present_inputs"))
            and old.get("grounding_threshold") == grounding_threshold)
    keys = ("inputs", "ok", "errors", "table", "faithfulness")
    return {k: old[k] for k in keys} if same and all(k in old for k in keys) else None


def format_summary(s: dict) -> str:
    lines = [f"dcam run {s['run']}: {s['inputs']} input rows, {s['ok']} ok, {s['inputs'] - s['ok']} errors"]
    if s.get("accounting"):
        a = s["accounting"]
        lines.append(f"  accounting: {a['present_inputs']} of {a['expected_inputs']} input rows (manifest) in final "
                     f"files, {a['shards_complete']} of {a['shards']} shards complete")
    for k, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  error {k:20s} {n}")
    if s.get("rows_per_s"):
        when = f"of {s['throughput_from']}" if s.get("throughput_from") else "this execution"
        lines.append(f"  throughput {when}: {s['rows_per_s']:.2f} input rows/s over {s['seconds']:.1f}s")
    if s["table"]:
        cols = ["rows", "obj_iou", "pointing", "pointing_tol", "energy", "wrong_object", "deletion_auc", "grounded_rate"]
        lines.append(format_table([("method", 18), ("refine", 20)], cols, s["table"], width=11, indent="  "))
    for f in s.get("faithfulness") or []:
        if f["deletion_auc"]["n"]:
            lines.append(f"  faithfulness {f['method']}/{f['refine']}: deletion AUC {_ci(f['deletion_auc'])}, insertion "
                         f"AUC {_ci(f['insertion_auc'])} (95% intervals; curves on {f['sampled']} of {f['words']} words)")
    return "\n".join(lines)


def _ci(d: dict) -> str:
    """'0.289 [0.281, 0.297] n=1192'."""
    ci = "" if d["lo"] is None else f" [{d['lo']:.3f}, {d['hi']:.3f}]"
    return f"{d['mean']:.3f}{ci} n={d['n']}"


RESULT_COLUMNS = ["shard", "row_index", "status", "error_kind", "method", "refine", "word_type", "faithfulness_sampled",
                  *TABLE_SCORES, "image_reliance"]


def results_summary(run: RunDir, cfg_hash: str, counts: dict, accounting, unchanged: bool = False,
                    grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD) -> dict:
    """The results part of summary.json, cross-checked: every input row the manifest lists is
    in the final files exactly once (ok or error), else AccountingError. `unchanged`: this run
    wrote no final file (a rerun of a finished run, verified by reconcile): the counts and tables
    of its complete summary.json are the results' own, so the final files are not read again."""
    acct = accounting.to_dict()
    results = previous_results(run, cfg_hash, acct, grounding_threshold) if unchanged else None
    if results is None:
        tally = ResultsTally(grounding_threshold)
        for t in iter_result_files(run, RESULT_COLUMNS):
            tally.add(t)
        results = dict(inputs=tally.inputs, ok=tally.ok, errors=tally.errors, table=tally.table(),
                       faithfulness=tally.faithfulness())
    s = dict(run=run.url, config_hash=cfg_hash, dcam_version=__version__, **results, accounting=acct,
             grounding_threshold=grounding_threshold, **throughput(run, counts))
    if not acct["exact"] or s["inputs"] != acct["expected_inputs"]:
        raise AccountingError(f"ACCOUNTING MISMATCH in {run.url}: the manifest lists {acct['expected_inputs']} input "
                              f"rows, the final files hold {s['inputs']} ({acct['present_inputs']} verified per shard); "
                              "no _SUCCESS written")
    s["results_status"] = "complete"
    return s


def finish_run(run: RunDir, d: dict, s: dict, log) -> dict:
    """summary.json, the report and the gates for complete results; sets s['exit_code']: 2 when a
    gate failed, else 3 when only the report failed, else 0."""
    s["report_status"] = "pending"
    run.write_text("summary.json", json.dumps(s, indent=1, default=float))
    log(format_summary(s))
    rep = d.get("report") or {}
    step, report_summary = report_step(run, d, log)
    s.update(step)
    s["gate"] = run_verdict(s, rep, report_summary)
    if not s["gate"]["passed"]:
        log(f"GATE FAILED (exit {EXIT_GATE_FAILED}): " + "; ".join(s["gate"]["reasons"]))
    s["exit_code"] = (EXIT_GATE_FAILED if not s["gate"]["passed"]
                      else EXIT_REPORT_FAILED if s["report_status"] == "failed" else 0)
    run.write_text("summary.json", json.dumps(s, indent=1, default=float))
    return s


def report_step(run: RunDir, d: dict, log) -> tuple[dict, dict | None]:
    """Build the report: (status fields, the report's summary). A failure is reported and
    recorded, never raised: the results stand."""
    if not (d.get("report") or {}).get("enabled", True):
        return dict(report_status="disabled"), None
    storage = d.get("storage") or {}
    try:
        out, report_summary = generate_report(run.url, storage, log=log)
    except Exception as e:  # noqa: BLE001 - recorded in summary.json and the exit code, not hidden
        msg = describe_error(e, secrets_of(storage))
        log(f"REPORT FAILED: {msg}. The audit's results are complete ({run.url}/_SUCCESS written); only the report "
            f"is missing: rerun `dcam report {run.url}` (exit status {EXIT_REPORT_FAILED})")
        return dict(report_status="failed", report_error=msg), None
    log(f"report: {out}")
    return dict(report_status="ok", report=out), report_summary


def throughput(run: RunDir, counts: dict) -> dict:
    """This execution's throughput; an execution that processed nothing (a rerun of a finished run)
    keeps the figures of the execution that did the work, from the previous summary.json."""
    if not counts.get("inputs") and run.exists("summary.json"):
        try:
            old = json.loads(run.read_text("summary.json"))
        except ValueError:
            old = {}
        if old.get("rows_per_s"):
            keep = {k: old.get(k) for k in ("seconds", "timing", "rows_per_s")}
            return dict(keep, throughput_from=old.get("throughput_from") or "an earlier execution of this run")
    return dict(seconds=counts.get("seconds", 0.0), timing=counts.get("timing", {}),
                rows_per_s=(counts["inputs"] / counts["seconds"]) if counts.get("seconds") else None)
