"""The report's sections, each a function of the report context (summary dict, the scan, the drift
and the gallery rows fetched from the run) returning Safe HTML. Corpus text is always escaped."""
from __future__ import annotations

from dcam.actors.schema import FAITHFULNESS_SCORES, MAP_STATS
from dcam.pipeline.report.grounding import highlight_spans, occurrence_of
from dcam.pipeline.report.render import (
    Safe,
    clip_text,
    esc,
    fmt,
    histograms,
    img_tag,
    interval_cell,
    map_view,
    overlay,
    plain_image,
    table,
)
from dcam.pipeline.report.scan import BOOT_METRICS, BREAKDOWN_METRICS
from dcam.pipeline.report.template import section

LOCALISATION = ("obj_iou", "contrast", "concentration", "f3", "f3_mean", "pointing", "pointing_tol", "energy",
                "wrong_object")
FAITHFULNESS = (*FAITHFULNESS_SCORES, *MAP_STATS)
HIST_METRICS = ("obj_iou", "contrast", "concentration", "f3", "energy", "deletion_auc", "insertion_auc", "map_top10")
LABELS = dict(obj_iou="Obj-IoU", contrast="contrast", concentration="concentration", f3="F3 (paper)",
              f3_mean="F3 per-image mean", pointing="pointing", pointing_tol="pointing (tol)", energy="energy",
              wrong_object="wrong object \u2193", deletion_auc="deletion AUC \u2193", insertion_auc="insertion AUC",
              map_top10="top-10% mass", map_entropy="map entropy \u2193", map_l1="map L1", map_cos="map 1-cos",
              image_reliance="image reliance", grounded_rate="grounded rate")
ROW_LABELS = dict(LABELS, f3="F3 (row mean)")  # breakdowns average the per-row F3


def _wrap(t: str) -> Safe:
    return Safe(f'<div class="tablewrap">{t}</div>')


def kpis(items: list[tuple[str, object]]) -> Safe:
    """A row of big figures: (label, value)."""
    cells = "".join(f'<div class="kpi"><b>{esc(fmt(v) if isinstance(v, (int, float)) else v)}</b>'
                    f'<span>{esc(k)}</span></div>' for k, v in items)
    return Safe(f'<div class="kpis">{cells}</div>')


def headline_table(rows: list[dict], metrics) -> Safe:
    """(method, refine, rows, metric cells with 95% intervals)."""
    body = [[r["method"], r["refine"], r["rows"], *[interval_cell(r["metrics"].get(m)) for m in metrics]] for r in rows]
    return _wrap(table(["method", "refine", "rows", *[LABELS[m] for m in metrics]], body))


def render_headline(ctx) -> Safe:
    """Counts, warnings and the per-(method, refine) headline tables."""
    s = ctx.summary
    warn = "".join(f'<div class="warn">{esc(w)}</div>' for w in s["warnings"])
    top = kpis([("input rows", s["inputs"]), ("ok", s["ok"]), ("errors", s["inputs"] - s["ok"]),
                ("result rows", s["rows"]), ("explained rows", s["explained_rows"])])
    if not s["headline"]:
        empty = '<p class="note">No explained rows: nothing to score.</p>'
        return section("headline", "Headline", Safe(warn + top + empty))
    body = (warn + top + "<h3>Localisation (needs masks)</h3>" + headline_table(s["headline"], LOCALISATION)
            + "<h3>Faithfulness and map shape</h3>" + headline_table(s["headline"], FAITHFULNESS))
    note = (f"Means over explained rows per (method, refine) with {s['bootstrap']['resamples']} bootstrap resamples "
            "(95% percentile intervals, seeded). F3 (paper) = harmonic mean of the dataset means of Obj-IoU, "
            "min(mean contrast/20, 1) and concentration; F3 per-image mean = mean of the per-row F3. "
            "Deletion/insertion AUCs are measured on the row's (refined) map; with probe.faithfulness_sample < 1 "
            "only the sampled words have them, the others are left out: n is the sample size. "
            "\u2193 = lower is better.")
    return section("headline", "Headline", Safe(body), note)


MAP_LEGEND = ('<p class="legend">left: the image; right: the map, one block per image-token cell '
              '<i></i> low \u2192 high; white outline: the named object</p>')


def card(images, title: str, lines: list[str], text: str | None = None) -> Safe:
    """A gallery card: images (PIL), a bold title, small lines and an optional text (all escaped)."""
    imgs = "".join(img_tag(im, title) for im in images)
    if len(images) > 1:
        imgs = f'<div class="pair">{imgs}</div>'
    small = "".join(f"<small>{esc(x)}</small>" for x in lines)
    txt = f'<div class="txt">{esc(clip_text(text))}</div>' if text else ""
    return Safe(f'<div class="card">{imgs}<div class="tok">{esc(title)}</div>{small}{txt}</div>')


def row_card(ctx, ref: dict, extra: str, extra2: str = "") -> Safe:
    """Card of one result row: the plain image and, beside it, the map at the same size (one block
    per token cell), both with the named object's outline; scores below."""
    r = ctx.row(ref) or {}
    thumb, mask = ctx.images(ref["shard"], ref["row_index"])
    images = [plain_image(thumb, mask, r.get("object_id")),
              map_view(thumb, r.get("map"), r.get("map_h"), r.get("map_w"), mask, r.get("object_id"))]
    step = "" if ref.get("step") is None else f" \u00b7 step {ref['step']}"
    lines = [f"{ref['method']}/{ref['refine']}{step}", extra,
             f"IoU {fmt(r.get('obj_iou'))} \u00b7 pt {fmt(r.get('pointing'), 0)} \u00b7 E {fmt(r.get('energy'), 2)}",
             f"del {fmt(r.get('deletion_auc'), 2)} \u00b7 ins {fmt(r.get('insertion_auc'), 2)}",
             f"{ref.get('id')} (row {ref['row_index']})"]
    if extra2:
        lines.insert(2, extra2)
    return card(images, str(ref.get("token")), lines, r.get("response"))


def gallery(ctx, items: list[dict], label, more=None) -> Safe:
    """A grid of row cards (`label(item)` is an extra caption line; `more(ctx, item)` another, optional)."""
    if not items:
        return Safe('<p class="note">No rows.</p>')
    return Safe('<div class="grid wide">' + "".join(row_card(ctx, it, label(it), more(ctx, it) if more else "")
                                                  for it in items) + "</div>")


def render_galleries(ctx) -> Safe:
    """Worst-k and best-k rows by Obj-IoU."""
    tops = ctx.scan.tops
    legend = Safe(MAP_LEGEND)
    if not tops["worst"].items:
        return section("galleries", "Galleries", Safe(legend + '<p class="note">No Obj-IoU in this run (no masks): '
                                                      'see Map faithfulness and Given without looking.</p>'))
    lab = lambda it: f"Obj-IoU {it['score']:.3f}"  # noqa: E731
    body = (legend + f"<h3>Worst {len(tops['worst'].items)} by Obj-IoU</h3>" + gallery(ctx, tops["worst"].items, lab)
            + f"<h3>Best {len(tops['best'].items)} by Obj-IoU</h3>" + gallery(ctx, tops["best"].items, lab))
    return section("galleries", "Galleries", Safe(body))


def render_label_free(ctx) -> Safe:
    """Map faithfulness without labels: the maps with the highest deletion AUC and the most diffuse maps."""
    tops = ctx.scan.tops
    body = Safe('<p class="note">Figures: the Headline\'s "Faithfulness and map shape" table.</p>' + MAP_LEGEND)
    body += "<h3>Highest deletion AUC (the word survives deleting the attributed cells)</h3>"
    body += gallery(ctx, tops["deletion"].items, lambda it: f"deletion AUC {it['score']:.3f}", reliance_line)
    body += "<h3>Most diffuse maps (lowest top-10% mass)</h3>"
    body += gallery(ctx, tops["diffuse"].items, lambda it: f"top-10% mass {it['score']:.3f}")
    note = ("These scores judge the MAP, not the answer; no masks needed. Deletion AUC: the word's probability as "
            "the image cells are blanked in the map's order, most attributed first (lower = the map found what the "
            "word depends on). Insertion AUC: the same, revealing cells into a blank image (higher = better). A high "
            "deletion AUC has two causes this section cannot tell apart: the map missed the evidence, or the word "
            "does not depend on the image at all. The second is measured directly, per answer, in \u201cGiven "
            "without looking\u201d (image reliance is shown under each card here). Map concentration: share of "
            "attribution mass in the top 10% of cells (higher = more focused) and normalised entropy (1 = uniform).")
    return section("label-free", "Map faithfulness (label-free)", Safe(body), note)


def reliance_line(ctx, ref: dict) -> str:
    """'image reliance 0.012 (given without looking)' for a gallery card, '' when not measured."""
    r = ctx.row(ref) or {}
    v = r.get("image_reliance")
    if v is None:
        return ""
    blind = (r.get("word_type") != "function") and v < ctx.summary["grounding"]["threshold"]
    return f"image reliance {fmt(v)}" + (" (given without looking)" if blind else "")


def highlighted_response(ctx, ref: dict, r: dict) -> Safe:
    """The response with the explained occurrence of the word marked (escaped)."""
    text = r.get("response") or ""
    rows = ctx.fetched.get((ref["shard"], ref["row_index"]), [])
    span = highlight_spans(text, ref.get("token"), occurrence_of(rows, ref.get("token"), ref.get("token_index")))
    text = clip_text(text, 400) if span is None or span[1] > 400 else text
    if span is None:
        return Safe(f'<div class="txt">{esc(text)}</div>')
    a, b = span
    return Safe(f'<div class="txt">{esc(text[:a])}<mark>{esc(text[a:b])}</mark>{esc(text[b:])}</div>')


def blind_card(ctx, ref: dict) -> Safe:
    """Card of a least image-reliant answer: the image, the response with the word marked, both probabilities."""
    r = ctx.row(ref) or {}
    thumb, mask = ctx.images(ref["shard"], ref["row_index"])
    kind = " \u00b7 ".join(str(x) for x in (r.get("word_type"), r.get("category")) if x)
    lines = [f"p(word | image) {fmt(r.get('target_prob'))}", f"p(word | image blanked) {fmt(r.get('blind_prob'))}",
             f"image reliance {fmt(r.get('image_reliance'))}", kind, f"{ref.get('id')} (row {ref['row_index']})"]
    small = "".join(f"<small>{esc(x)}</small>" for x in lines if x)
    img = img_tag(plain_image(thumb, None, None), str(ref.get("token")))
    return Safe(f'<div class="card">{img}<div class="tok">{esc(ref.get("token"))}</div>{small}'
                f'{highlighted_response(ctx, ref, r)}</div>')


def grounding_table(rows: list[dict], dim: str, limit: int) -> Safe:
    """Blind share with its Wilson interval and mean image reliance per value of `dim`."""
    shown = sorted(rows, key=lambda r: -r["words"])[:limit]
    body = [[r["method"], r["refine"], r["key"], r["words"], r["blind"],
             interval_cell(dict(mean=r["blind_rate"], lo=r["lo"], hi=r["hi"], n=r["words"])), fmt(r["image_reliance"])]
            for r in shown]
    more = f" (top {limit} of {len(rows)} by words; all in summary.parquet)" if len(rows) > limit else ""
    head = ["method", "refine", dim, "content words", "given without looking", "share (95% CI)", "mean reliance"]
    return Safe(f"<h3>per {esc(dim)}{esc(more)}</h3>" + _wrap(table(head, body)))


def render_grounding(ctx, limit: int = 25) -> Safe:
    """Which answers were given without looking: headline share, breakdowns, least image-reliant answers."""
    g = ctx.summary["grounding"]
    thr = g["threshold"]
    heads = [(r, r["metrics"].get("grounded_rate") or {}) for r in ctx.summary["headline"]]
    if not any(m.get("n") for _, m in heads):
        return section("grounding", "Given without looking", Safe(
            '<p class="note">No content word with an image_reliance in this run (written by a dcam without the '
            'blind forward, or no explained content words).</p>'))
    body = [[r["method"], r["refine"], m["n"], interval_cell(_blind_share(m)),
             interval_cell(r["metrics"].get("image_reliance"))] for r, m in heads]
    parts = [_wrap(table(["method", "refine", "content words", "given without looking (95% CI)",
                          "mean image reliance (95% CI)"], body))]
    parts += [grounding_table(g["breakdowns"].get(dim, []), dim, limit) for dim in ("word_type", "category", "token")]
    items = ctx.scan.tops["blind"].items
    cards = "".join(blind_card(ctx, it) for it in items) or '<p class="note">No rows.</p>'
    parts.append(f"<h3>Least image-reliant answers ({len(items)})</h3><div class=\"grid\">{cards}</div>")
    note = (f"Per explained content word (word type other than \u201cfunction\u201d): image reliance = p(word | image) "
            "\u2212 p(word | every image token blanked), both at the word's own denoising state. A word is given "
            f"without looking when its image reliance is below {thr:g} (report.grounding_threshold). This judges "
            "the ANSWER, not the map: such a word would have been said with no image at all. Headline intervals: "
            "row bootstrap; per-value intervals: Wilson, treating words as independent (words of one image are "
            "not, so they understate the uncertainty). Gate on it with --fail-under grounded_rate=0.9.")
    return section("grounding", "Given without looking", Safe("".join(parts)), note)


def _blind_share(m: dict) -> dict:
    """The blind share (1 - grounded_rate) with its interval."""
    flip = lambda v: None if v is None else 1.0 - v  # noqa: E731
    return dict(mean=flip(m.get("mean")), lo=flip(m.get("hi")), hi=flip(m.get("lo")), n=m.get("n"))


def render_breakdowns(ctx, limit: int = 25) -> Safe:
    """Per token, category, word_type and shard (top `limit` by rows)."""
    parts = []
    for dim in ("token", "category", "word_type", "shard"):
        rows = ctx.summary["breakdowns"].get(dim, [])
        shown = sorted(rows, key=lambda r: -r["rows"])[:limit]
        body = [[r["method"], r["refine"], r["key"], r["rows"], *[r[m] for m in BREAKDOWN_METRICS]] for r in shown]
        more = f" (top {limit} of {len(rows)} by rows; all in summary.parquet)" if len(rows) > limit else ""
        parts.append(f"<h3>per {esc(dim)}{esc(more)}</h3>" + _wrap(table(
            ["method", "refine", dim, "rows", *[ROW_LABELS.get(m, m) for m in BREAKDOWN_METRICS]], body)))
    note = "Means of the per-row scores over explained rows (F3 column = per-row F3); null values are not counted."
    return section("breakdowns", "Breakdowns", Safe("".join(parts)), note)


def render_histograms(ctx) -> Safe:
    """Histograms of per-row scores (from the bounded uniform sample)."""
    sample = ctx.scan.sample
    if not len(sample.p):
        return section("histograms", "Histograms", Safe('<p class="note">No explained rows.</p>'))
    names = [f"{m}/{r}" for (m, r) in sorted(ctx.scan.boot.index, key=ctx.scan.boot.index.get)]
    cols = [BOOT_METRICS.index(m) for m in HIST_METRICS]
    img = histograms(sample.x[:, cols], sample.g, names, list(HIST_METRICS))
    note = (f"Per-row scores of a uniform random sample of {len(sample.p):,} of {ctx.summary['explained_rows']:,} "
            "explained rows (f3 = per-row F3; map_top10 = share of map mass in its top 10% cells); one line per "
            "(method, refine). Binary scores (pointing) are in the headline only.")
    return section("histograms", "Histograms", img_tag(img, "histograms of per-row scores", "hist"), note)


def render_steps(ctx) -> Safe:
    """Strips of per-step maps and the per-step table (when the run has several steps)."""
    if not ctx.scan.multistep:
        return section("steps", "Steps", Safe('<p class="note">No per-step maps in this run '
                                              '(run with probe.per_step=true for trajectory strips).</p>'))
    parts = []
    for shard, row_index, method, token_index in ctx.scan.strips:
        rows = sorted((r for r in ctx.fetched.get((shard, row_index), []) if r["method"] == method
                       and r["token_index"] == token_index and r["step"] is not None), key=lambda r: r["step"])
        if not rows:
            continue
        thumb, mask = ctx.images(shard, row_index)
        figs = "".join(
            f'<figure>{img_tag(overlay(thumb, r["map"], r["map_h"], r["map_w"], mask, r["object_id"], px=96), "step")}'
            f'<figcaption>step {esc(r["step"])}<br>IoU {esc(fmt(r["obj_iou"]))}</figcaption></figure>' for r in rows)
        title = f"{rows[0]['token']} \u00b7 {method}/{rows[0]['refine']} \u00b7 {rows[0]['id']} (row {row_index})"
        parts.append(f"<h3>{esc(title)}</h3><div class=\"strip\">{figs}</div>")
    bd = ctx.summary["breakdowns"].get("step", [])
    body = [[r["method"], r["refine"], r["key"], r["rows"], *[r[m] for m in BREAKDOWN_METRICS]]
            for r in sorted(bd, key=lambda r: (r["method"], r["refine"], r["key"]))]
    parts.append("<h3>per step</h3>" + _wrap(table(["method", "refine", "step", "rows",
                                                    *[ROW_LABELS.get(m, m) for m in BREAKDOWN_METRICS]], body)))
    return section("steps", "Steps", Safe("".join(parts)), "Maps of the same word across denoising steps.")


def render_failures(ctx) -> Safe:
    """Error rows by error_kind with examples."""
    fails = ctx.summary["failures"]
    if not fails:
        return section("failures", "Failures", Safe('<p class="note">No error rows.</p>'))
    rows = []
    for f in fails:
        ex = "".join(f"<div>{esc(e['id'])} <small>{esc(e['shard'])} row {esc(e['row_index'])}</small>"
                     f'<div class="err">{esc(clip_text(e["error"], 300))}</div></div>' for e in f["examples"])
        rows.append([f["error_kind"], f["count"], Safe(ex)])
    return section("failures", "Failures", _wrap(table(["error_kind", "rows", "examples"], rows)),
                   "Input rows that produced an error row, by reason, with up to 3 examples each.")


def render_drift(ctx) -> Safe:
    """Paired deltas against the baseline and the maps that moved most."""
    d = ctx.summary.get("drift")
    if not d:
        return section("drift", "Drift",
                       Safe('<p class="note">No baseline given (dcam report RUN --baseline OTHER_RUN).</p>'))
    c = d["counts"]
    top = kpis([("paired rows", c["pairs"]), ("rows here", c["this_rows"]), ("rows in baseline", c["base_rows"]),
                ("shards paired", c["shards_paired"]), ("shards only here", c["shards_this_only"]),
                ("shards only in baseline", c["shards_base_only"])])
    metrics = ("obj_iou", "f3", "pointing", "energy", "contrast", "concentration", "deletion_auc", "insertion_auc",
               "map_l1", "map_cos")
    body = [[r["method"], r["refine"], r["pairs"],
             *[interval_cell(r["metrics"].get(m), "delta", True) for m in metrics]] for r in d["table"]]
    tab = _wrap(table(["method", "refine", "pairs", *[LABELS.get(m, m) for m in metrics]], body))
    cards = "".join(_moved_card(ctx, it) for it in ctx.drift.moved.items) or '<p class="note">No paired rows.</p>'
    note = (f"This run minus the baseline ({d['baseline']}), over rows paired on (shard, row_index, method, "
            "token_index, step); 95% bootstrap intervals over the pairs. map L1 / 1-cos: distance between the "
            "paired maps.")
    return section("drift", "Drift", Safe(top + tab + "<h3>Maps that moved most (1 - cosine)</h3>"
                                          f'<div class="grid wide">{cards}</div>'), note)


def _moved_card(ctx, it: dict) -> Safe:
    thumb, mask = ctx.images(it["shard"], it["row_index"])
    r = ctx.row(it) or {}
    a = overlay(thumb, it["map"], it["map_h"], it["map_w"], mask, r.get("object_id"))
    b = overlay(thumb, it["base_map"], it["base_h"], it["base_w"], mask, r.get("object_id"))
    lines = [f"{it['method']}/{it['refine']}" + ("" if it["step"] is None else f" \u00b7 step {it['step']}"),
             "left: this run \u00b7 right: baseline", f"1-cos {it['score']:.3f} \u00b7 L1 {it['l1']:.3f}",
             f"IoU {fmt(it['obj_iou'])} vs {fmt(it['base_obj_iou'])}", f"{it['id']} (row {it['row_index']})"]
    return card([a, b], str(it["token"]), lines)



DASH = "\u2013"


def render_audit(ctx) -> Safe:
    """What was audited: responses (own answers or given captions), method settings, inputs expected
    vs present, dcam versions and the resolved config."""
    a = ctx.summary["audit"]
    r, i = a["responses"], a["inputs"]
    present = "\u2013" if i["expected_rows"] is None else f"{i['present_rows']:,} of {i['expected_rows']:,}"
    top = kpis([("responses", r["verdict"].split(" (")[0]), ("input rows present / expected", present),
                ("result files / shards", f"{i['result_files']} / {i['expected_shards'] or DASH}"),
                ("run written by dcam", a["run_dcam_version"] or "unknown"),
                ("report by dcam", a["report_dcam_version"])])
    resp = (f"<p>Responses: <b>{esc(r['verdict'])}</b> \u2014 {esc(r['generated'])} samples generated by the model, "
            f"{esc(r['given'])} given by the input.</p>")
    cols = ["method", "preset", "state", "hook", "variant", "contrast", "refinement", "refine_settings"]
    methods = _wrap(table([*cols[:-1], "refine overrides"], [[m.get(c) for c in cols] for m in a["methods"]]))
    cfg = a["config"]
    conf = ('<details><summary>resolved config (config.json, credentials redacted)</summary>'
            f'<pre class="conf">{esc(_yaml(cfg))}</pre></details>') if cfg else \
        '<p class="note">No config.json in this run directory (written by an older dcam).</p>'
    note = ("state and hook are read from the result rows; preset, variant and contrast from the run's stored config. "
            f"config hash {a['config_hash'] or DASH}.")
    return section("audit", "Audit trail", Safe(top + resp + "<h3>Method settings</h3>" + methods + conf), note)


def _yaml(d) -> str:
    """A config as YAML text (omegaconf's dump: the same format as conf/*.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))
