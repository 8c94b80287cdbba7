"""`dcam report`: the audit report of a run directory (local or any fsspec URL).

    build_report(run_url, storage_options, out_dir=None, baseline_url=None, log=print) -> HTML path
    main_report(args) -> exit code (0, or 2 when --fail-under thresholds are missed)

Writes <out>/report.html (self-contained: inline CSS, images as base64 PNG data URIs, no scripts,
opens offline), <out>/summary.json (every figure) and <out>/summary.parquet (the same figures in
long form: section, method, refine, key, metric, value, lo, hi, n). Default out: <run>/report.

Memory is bounded: one streaming pass over the result files reads only scalar columns and the maps
(pipeline.report_scan); thumbnails and whole rows are read only for the few gallery samples; drift
pairs rows one input shard at a time (pipeline.report_drift). Headline metric names (usable in
--fail-under): obj_iou, contrast, concentration, f3 (paper's aggregation of the dataset means),
f3_mean (mean of the per-row F3), pointing, pointing_tol, energy, wrong_object, deletion_auc,
insertion_auc, map_top10 (share of map mass in the top 10% of cells), map_entropy (normalised),
image_reliance and grounded_rate (content words; pipeline/report/grounding.py). Lower is better for
deletion_auc, wrong_object and map_entropy. Options: k, resamples, seed, grounding_threshold (default:
the run's report.grounding_threshold).
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dcam.pipeline.console import format_table
from dcam.pipeline.manifest import MANIFEST, SUCCESS, RunDir
from dcam.pipeline.report.audit import audit_trail, audit_warnings
from dcam.pipeline.report.drift import Drift
from dcam.pipeline.report.gate import gate, parse_thresholds
from dcam.pipeline.report.grounding import DEFAULT_GROUNDING_THRESHOLD, GROUNDING_DIMS
from dcam.pipeline.report.scan import (
    BOOT_METRICS,
    BREAKDOWN_DIMS,
    RunScan,
    f3_aggregate,
    interval,
    iter_batches,
    num,
    result_files,
)
from dcam.pipeline.report.sections import (
    render_audit,
    render_breakdowns,
    render_drift,
    render_failures,
    render_galleries,
    render_grounding,
    render_headline,
    render_histograms,
    render_label_free,
    render_steps,
)
from dcam.pipeline.report.template import page
from dcam.pipeline.run_config import read_run_config
from dcam.pipeline.storage import join_url, open_fs, redact, secrets_of, with_retries

FETCH_COLS = ["id", "shard", "row_index", "response", "token", "token_index", "object_id", "method", "refine", "step",
              "map", "map_h", "map_w", "obj_iou", "pointing", "energy", "deletion_auc", "insertion_auc", "thumbnail",
              "mask_thumbnail", "word_type", "category", "target_prob", "blind_prob", "image_reliance"]
OPTIONS = dict(k=8, resamples=1000, seed=0, grounding_threshold=None)


class NoRunError(ValueError):
    """`dcam report` was pointed at a path that holds no dcam run (nothing is written there)."""


def require_run(run: RunDir, display_url: str) -> None:
    """Refuse a path with neither manifest.json nor result files: a typo must not become an empty
    'report' (exit 0) nor create the directory."""
    if run.exists(MANIFEST) or result_files(run.fs, run.root):
        return
    raise NoRunError(f"{display_url} holds no dcam run (no manifest.json, no results/*.parquet); nothing written")


@dataclass
class Context:
    """What the section renderers read: the summary, the scan, the drift, and the fetched gallery rows."""
    summary: dict
    scan: RunScan
    drift: Drift | None
    fetched: dict

    def row(self, ref: dict) -> dict | None:
        """The fetched result row identified by a gallery reference."""
        for r in self.fetched.get((ref["shard"], ref["row_index"]), []):
            if (r["method"], r["refine"], r["token_index"], r["step"]) == \
                    (ref["method"], ref["refine"], ref["token_index"], ref["step"]):
                return r
        return None

    def images(self, shard, row_index) -> tuple[bytes | None, bytes | None]:
        """(thumbnail, mask_thumbnail) of a sample: carried by its first row only."""
        for r in self.fetched.get((shard, row_index), []):
            if r.get("thumbnail"):
                return r["thumbnail"], r.get("mask_thumbnail")
        return None, None


def headline(scan: RunScan) -> list[dict]:
    """Per (method, refine): rows and {metric: {mean, lo, hi, n}} incl. the paper's F3 per replicate."""
    boot, out = scan.boot, []
    j = {m: BOOT_METRICS.index(m) for m in ("obj_iou", "contrast", "concentration")}
    for key, g in sorted(boot.index.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        means, reps = boot.means(g), boot.replicates(g)
        metrics = {}
        for i, m in enumerate(BOOT_METRICS):
            lo, hi = interval(reps[i])
            metrics["f3_mean" if m == "f3" else m] = dict(mean=num(means[i]), lo=lo, hi=hi, n=int(boot.n[g][i]))
        parts = [j["obj_iou"], j["contrast"], j["concentration"]]
        lo, hi = interval(f3_aggregate(*reps[parts]))
        metrics["f3"] = dict(mean=num(f3_aggregate(*means[parts])), lo=lo, hi=hi, n=int(min(boot.n[g][parts])))
        out.append(dict(method=key[0], refine=key[1], rows=scan.group_rows.get(g, 0), metrics=metrics))
    return out


def shards_of_files(fs, files: list[str]) -> dict[str, list[str]]:
    """{shard URL: [result files holding it]} from the `shard` column only."""
    out: dict[str, list[str]] = {}
    for path in files:
        seen = set()
        for batch in iter_batches(fs, path, ["shard"]):
            seen.update(pc.unique(batch.column("shard")).to_pylist())
        for s in seen:
            out.setdefault(s, []).append(path)
    return out


def wanted_samples(scan: RunScan, drift: Drift | None) -> dict[str, set]:
    """{shard: {row_index}} of every sample shown in a gallery or strip."""
    want: dict[str, set] = {}
    refs = [it for top in scan.tops.values() for it in top.items] + (drift.moved.items if drift else [])
    for r in refs:
        want.setdefault(r["shard"], set()).add(r["row_index"])
    for shard, row_index, _, _ in scan.strips:
        want.setdefault(shard, set()).add(row_index)
    return want


def run_info(run: RunDir) -> dict:
    """manifest fields (when present) and whether the run finished."""
    info = dict(complete=run.exists(SUCCESS), manifest=None)
    if run.exists(MANIFEST):
        try:
            doc = json.loads(run.read_text(MANIFEST))
            info["manifest"] = {k: doc.get(k) for k in ("input", "created", "config_hash", "total_rows")}
            info["manifest"]["shards"] = len(doc.get("shards", []))
        except ValueError:
            info["manifest"] = None
    return info


def accounting(s: dict) -> dict:
    """Input rows the manifest lists vs input rows present in the result files."""
    expected = (s.get("manifest") or {}).get("total_rows")
    return dict(expected_inputs=expected, present_inputs=s["inputs"], exact=expected == s["inputs"])


def accounting_failure(s: dict) -> str | None:
    """A run that claims _SUCCESS while its result files disagree with its manifest."""
    a = s["accounting"]
    if s["complete"] and a["expected_inputs"] is not None and not a["exact"]:
        return (f"ACCOUNTING MISMATCH: {SUCCESS} is present but the result files hold {a['present_inputs']} of the "
                f"{a['expected_inputs']} input rows the manifest lists")
    return None


def warnings_for(s: dict, scan: RunScan) -> list[str]:
    """Plain-language caveats shown on top of the report."""
    w = [accounting_failure(s)] if accounting_failure(s) else []
    if not s["complete"]:
        w.append(f"{SUCCESS} is missing: the run has not finished; this report covers the {s['files']} result files "
                 "written so far.")
    if not s["files"]:
        w.append("No result files under results/.")
    if s["rows"] and not s["ok"]:
        w.append("Every input row failed: see Failures.")
    if s["headline"] and all(r["metrics"]["obj_iou"]["n"] == 0 for r in s["headline"]):
        w.append("No masks in this corpus (Obj-IoU is null everywhere): localisation scores are empty; "
                 "use Map faithfulness and Given without looking.")
    if len(scan.hashes) > 1:
        w.append(f"Results come from {len(scan.hashes)} config hashes: {sorted(scan.hashes)}.")
    return w


def summarise(run: RunDir, run_url: str, storage_options: dict, info: dict, files: list[str], scan: RunScan,
              drift: Drift | None, baseline_url: str | None, opts: dict) -> dict:
    """The summary.json document."""
    secrets = secrets_of(storage_options)
    errors = {f["error_kind"]: f["count"] for f in scan.failures.table()}
    s = dict(run=redact(run_url, secrets), baseline=redact(baseline_url, secrets) if baseline_url else None,
             complete=info["complete"], manifest=info["manifest"], files=len(files),
             model_ids=sorted(scan.models), config_hashes=sorted(scan.hashes),
             inputs=scan.counts["ok_inputs"] + scan.counts["error_rows"], ok=scan.counts["ok_inputs"], errors=errors,
             rows=scan.counts["rows"], explained_rows=sum(scan.group_rows.values()),
             untargeted_rows=scan.counts["untargeted_rows"], headline=headline(scan),
             breakdowns={d: scan.breakdowns.table(d) for d in BREAKDOWN_DIMS}, failures=scan.failures.table(),
             galleries={k: [{c: it[c] for c in ("shard", "row_index", "method", "refine", "token_index", "step", "id",
                                                 "token", "score")} for it in t.items] for k, t in scan.tops.items()},
             multistep=scan.multistep, grounding=grounding_summary(scan),
             bootstrap=dict(resamples=opts["resamples"], seed=opts["seed"], kind="poisson (streaming)"))
    if drift is not None:
        s["drift"] = dict(baseline=s["baseline"], counts=drift.counts, table=drift.table())
    s["accounting"] = accounting(s)
    s["audit"] = audit_trail(scan, info, read_run_config(run), s["inputs"], len(files))
    s["warnings"] = warnings_for(s, scan) + audit_warnings(s["audit"])
    return s


def grounding_summary(scan: RunScan) -> dict:
    """The "Given without looking" figures: threshold and the per word / word type / category tables."""
    return dict(threshold=scan.grounding_threshold,
                breakdowns={d: scan.grounding.table(d) for d in GROUNDING_DIMS})


def grounding_threshold_of(run: RunDir, opts: dict) -> float:
    """The threshold: `grounding_threshold=` given to `dcam report`, else the run's own
    report.grounding_threshold (config.json), else the default."""
    if opts.get("grounding_threshold") is not None:
        return float(opts["grounding_threshold"])
    stored = ((read_run_config(run) or {}).get("config") or {}).get("report") or {}
    return float(stored.get("grounding_threshold", DEFAULT_GROUNDING_THRESHOLD))


def summary_table(s: dict) -> pa.Table:
    """The summary's figures in long form (one row per section/method/refine/key/metric)."""
    rows = []
    for r in s["headline"]:
        rows += [("headline", r["method"], r["refine"], None, m, d["mean"], d["lo"], d["hi"], d["n"])
                 for m, d in r["metrics"].items()]
    for dim, table in s["breakdowns"].items():
        for r in table:
            rows += [(f"breakdown:{dim}", r["method"], r["refine"], None if r["key"] is None else str(r["key"]), m,
                      r[m], None, None, r[f"{m}_n"]) for m in BOOT_METRICS if m in r]
            rows.append((f"breakdown:{dim}", r["method"], r["refine"], None if r["key"] is None else str(r["key"]),
                         "rows", float(r["rows"]), None, None, r["rows"]))
    for dim, table in (s.get("grounding") or {}).get("breakdowns", {}).items():
        for r in table:
            key = None if r["key"] is None else str(r["key"])
            rows.append((f"grounding:{dim}", r["method"], r["refine"], key, "blind_rate", r["blind_rate"], r["lo"],
                         r["hi"], r["words"]))
            rows.append((f"grounding:{dim}", r["method"], r["refine"], key, "image_reliance", r["image_reliance"],
                         None, None, r["words"]))
    for r in (s.get("drift") or {}).get("table", []):
        rows += [("drift", r["method"], r["refine"], None, m, d["delta"], d["lo"], d["hi"], d["n"])
                 for m, d in r["metrics"].items()]
    for f in s["failures"]:
        rows.append(("failures", None, None, f["error_kind"], "rows", float(f["count"]), None, None, f["count"]))
    names = ["section", "method", "refine", "key", "metric", "value", "lo", "hi", "n"]
    types = [pa.string()] * 5 + [pa.float64()] * 3 + [pa.int64()]
    cols = list(zip(*rows)) if rows else [[] for _ in names]
    return pa.table([pa.array(list(c), type=t) for c, t in zip(cols, types)], names=names)


def write_outputs(out_url: str, storage_options: dict, html: str, summary: dict) -> str:
    """report.html, summary.json, summary.parquet under out_url; returns the HTML's path or URL."""
    fs, root = open_fs(out_url, storage_options)
    root = root.rstrip("/")
    buf = io.BytesIO()
    pq.write_table(summary_table(summary), buf, compression="zstd")
    blobs = {"summary.json": json.dumps(summary, indent=1, default=float).encode(),
             "summary.parquet": buf.getvalue(), "report.html": html.encode("utf-8")}
    fs.makedirs(root, exist_ok=True)
    for name, data in blobs.items():
        with_retries(lambda: fs.pipe_file(f"{root}/{name}", data))
    return f"{root}/report.html" if "://" not in out_url else join_url(out_url, "report.html")


def generate_report(run_url: str, storage_options: dict | None = None, out_dir: str | None = None,
                    baseline_url: str | None = None, log=print, fail_under: dict | None = None,
                    allow_partial: bool = False, **options) -> tuple[str, dict]:
    """Build the report; returns (HTML path, summary dict incl. the fail_under verdict). NoRunError
    when the path holds no run."""
    opts = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    storage_options = storage_options or {}
    run = RunDir(run_url, storage_options)
    require_run(run, redact(run_url, secrets_of(storage_options)))
    files = result_files(run.fs, run.root)
    log(f"report: scanning {len(files)} result files of {redact(run_url, secrets_of(storage_options))}")
    threshold = grounding_threshold_of(run, opts)
    scan = RunScan(k=opts["k"], resamples=opts["resamples"], seed=opts["seed"],
                   grounding_threshold=threshold).scan(run.fs, files)
    drift = None
    if baseline_url:
        base = RunDir(baseline_url, storage_options)
        require_run(base, redact(baseline_url, secrets_of(storage_options)))
        base_files = shards_of_files(base.fs, result_files(base.fs, base.root))
        log(f"report: pairing with the baseline ({len(base_files)} shards)")
        drift = Drift(k=opts["k"], resamples=opts["resamples"], seed=opts["seed"], grounding_threshold=threshold).run(
            run.fs, scan.files_by_shard, base.fs, base_files)
    fetched = _fetch(run, scan, drift)
    summary = summarise(run, run_url, storage_options, run_info(run), files, scan, drift, baseline_url, opts)
    summary["fail_under"] = gate(summary, fail_under or {}, allow_partial)
    if accounting_failure(summary):  # fails loudly, thresholds or not
        summary["fail_under"] = {**summary["fail_under"], "passed": False,
                                 "reasons": [accounting_failure(summary), *summary["fail_under"]["reasons"]]}
    ctx = Context(summary, scan, drift, fetched)
    body = [render_headline(ctx), render_audit(ctx), render_grounding(ctx), render_label_free(ctx), render_breakdowns(ctx),
            render_histograms(ctx), render_galleries(ctx), render_steps(ctx), render_failures(ctx), render_drift(ctx)]
    meta = [f"run: {summary['run']}", f"model: {', '.join(summary['model_ids']) or '-'} \u00b7 config: "
            f"{', '.join(summary['config_hashes']) or '-'} \u00b7 {summary['files']} result files"
            + ("" if summary["complete"] else " \u00b7 UNFINISHED")]
    if summary["manifest"]:
        meta.append(f"input: {summary['manifest'].get('input')} \u00b7 created {summary['manifest'].get('created')}")
    html = page("dcam audit report", meta, body)
    path = write_outputs(out_dir or join_url(run_url, "report"), storage_options, html, summary)
    summary["report"] = path
    log(f"report: wrote {path}")
    return path, summary


def _fetch(run: RunDir, scan: RunScan, drift: Drift | None) -> dict:
    from dcam.pipeline.report.scan import fetch_rows

    return fetch_rows(run.fs, scan.files_by_shard, wanted_samples(scan, drift), FETCH_COLS)


def build_report(run_url: str, storage_options: dict | None = None, out_dir: str | None = None,
                 baseline_url: str | None = None, log=print, **options) -> str:
    """Write the report of a run (see module doc); returns the path (or URL) of report.html."""
    return generate_report(run_url, storage_options, out_dir, baseline_url, log, **options)[0]


def parse_options(overrides: list[str] | None) -> dict:
    """`storage.*=...`, `k=`, `resamples=`, `seed=` dotlist overrides of `dcam report`."""
    from omegaconf import OmegaConf

    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    d = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides or [])), resolve=True)
    unknown = set(d) - {"storage", *OPTIONS}
    if unknown:
        raise ValueError(f"unknown report option(s) {sorted(unknown)}; known: storage.*, {', '.join(OPTIONS)}")
    return d


def format_text(s: dict) -> str:
    """The headline as a terminal table."""
    cols = ["rows", "obj_iou", "f3", "pointing", "energy", "deletion_auc", "map_top10", "grounded_rate"]
    rows = [dict(method=r["method"], refine=r["refine"], rows=r["rows"], **{c: r["metrics"][c]["mean"] for c in cols[1:]})
            for r in s["headline"]]
    lines = [f"dcam report {s['run']}: {s['inputs']} input rows, {s['ok']} ok, {s['inputs'] - s['ok']} errors, "
             f"{s['rows']} result rows", format_table([("method", 18), ("refine", 20)], cols, rows, width=12, indent="  "),
             f"  report: {s['report']}"]
    return "\n".join(lines)


def main_report(args) -> int:
    """`dcam report RUN [--baseline OTHER] [--fail-under k=v,...] [--out DIR] [--json] [overrides]`."""
    try:
        opts = parse_options(getattr(args, "overrides", None))
        thresholds = parse_thresholds(getattr(args, "fail_under", None))
    except ValueError as e:
        print(f"dcam report: {e}", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    storage = opts.pop("storage", None) or {}
    try:
        _, s = generate_report(args.run_dir, storage, getattr(args, "out", None), getattr(args, "baseline", None),
                               log, fail_under=thresholds, allow_partial=getattr(args, "allow_partial", False), **opts)
    except NoRunError as e:
        print(f"dcam report: {e}", file=sys.stderr)
        return 2
    if not s["complete"]:
        print(f"WARNING: {s['run']} has no {SUCCESS}: the run has not finished (or failed); this report covers the "
              f"{s['files']} result files written so far", file=sys.stderr)
    verdict = s["fail_under"]
    if getattr(args, "json", False):
        keep = ("run", "report", "baseline", "complete", "accounting", "inputs", "ok", "errors", "rows",
                "explained_rows", "headline", "warnings")
        out = {k: s.get(k) for k in keep}
        out["drift"] = (s.get("drift") or {}).get("table")
        out["fail_under"] = verdict
        print(json.dumps(out, default=float))
    else:
        print(format_text(s))
    if not verdict["passed"]:
        print("FAIL-UNDER: " + "; ".join(verdict["reasons"]), file=sys.stderr)
        return 2
    return 0
