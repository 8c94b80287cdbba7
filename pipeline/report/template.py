"""The report's page skeleton and stylesheet: one self-contained HTML file (inline CSS, images as
data URIs, no JavaScript, no external fetches), readable offline and printable."""
from __future__ import annotations

from dcam.pipeline.report.render import Safe, esc

CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --card:#fff; --accent:#3656d3;
        --bad:#b42318; --good:#067647; }
* { box-sizing:border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#111827; color:#f9fafb; padding:18px 28px 14px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:650; }
header .meta { color:#cbd2dd; font-size:13px; word-break:break-all; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line);
      padding:8px 28px; display:flex; flex-wrap:wrap; gap:6px 16px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; }
main { max-width:1360px; margin:0 auto; padding:8px 28px 40px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 18px 16px;
          margin:16px 0; }
h2 { font-size:18px; margin:2px 0 8px; }
h3 { font-size:15px; margin:14px 0 6px; }
p.note { color:var(--muted); margin:4px 0 10px; font-size:13px; }
.kpis { display:flex; flex-wrap:wrap; gap:10px; margin:4px 0 6px; }
.kpi { border:1px solid var(--line); border-radius:8px; padding:8px 12px; min-width:120px; background:#fbfcfe; }
.kpi b { display:block; font-size:20px; }
.kpi span { color:var(--muted); font-size:12px; }
.warn { background:#fffaeb; border:1px solid #fedf89; color:#7a2e0e; padding:8px 12px; border-radius:8px;
        margin:8px 0; }
.tablewrap { overflow-x:auto; }
table { border-collapse:collapse; font-size:12.5px; margin:4px 0 8px; }
th, td { border-bottom:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:#f2f4f7; font-weight:600; position:sticky; top:0; }
tbody tr:nth-child(even) { background:#fafbfc; }
td small, .card small { color:var(--muted); display:block; font-size:11px; overflow-wrap:anywhere; }
td b { font-variant-numeric:tabular-nums; }
.na { color:#98a2b3; }
td.err, .err { color:var(--bad); font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px;
               word-break:break-word; max-width:640px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(146px, 1fr)); gap:10px; }
.grid.wide { grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); }
.card { border:1px solid var(--line); border-radius:8px; padding:6px; background:#fff; font-size:12px; min-width:0; }
.card img { display:block; width:100%; height:auto; border-radius:4px; image-rendering:auto; }
.card .pair { display:flex; gap:4px; }
.card .pair img { width:50%; }
.card .tok { font-weight:650; font-size:13px; word-break:break-word; }
.card .txt { color:#475467; word-break:break-word; margin-top:2px; }
.card mark { background:#fde68a; color:#111; padding:0 2px; border-radius:2px; }
.strip { display:flex; gap:6px; overflow-x:auto; padding-bottom:4px; margin-bottom:10px; }
.strip figure { margin:0; text-align:center; font-size:11px; color:var(--muted); }
.strip img { width:96px; height:auto; display:block; border-radius:3px; }
img.hist { max-width:100%; height:auto; }
.legend { font-size:12px; color:var(--muted); }
.legend i { display:inline-block; width:120px; height:10px; vertical-align:middle; border-radius:2px;
            background:linear-gradient(90deg,#30123b,#4686fb,#1ae4b6,#a2fc3c,#fabb39,#e4460a,#7a0403); }
.delta-pos { color:var(--good); } .delta-neg { color:var(--bad); }
details { margin:10px 0 2px; } summary { cursor:pointer; color:var(--accent); }
pre.conf { background:#f8f9fb; border:1px solid var(--line); border-radius:6px; padding:8px 10px; font-size:12px;
           max-height:480px; overflow:auto; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:16px; }
@media print { nav { position:static; } section { break-inside:avoid; } }
"""

SECTIONS = (("headline", "Headline"), ("audit", "Audit trail"), ("grounding", "Given without looking"),
            ("label-free", "Map faithfulness"),
            ("breakdowns", "Breakdowns"), ("histograms", "Histograms"), ("galleries", "Galleries"), ("steps", "Steps"),
            ("failures", "Failures"), ("drift", "Drift"))


def section(sid: str, title: str, body: str, note: str | None = None) -> Safe:
    """<section id=sid> with a heading, an optional (escaped) note and Safe body HTML."""
    n = f'<p class="note">{esc(note)}</p>' if note else ""
    return Safe(f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{n}{body}</section>')


def page(title: str, header_meta: list[str], body: list[str]) -> str:
    """The whole document. `header_meta` lines are escaped here; `body` parts must be Safe."""
    assert all(isinstance(b, Safe) for b in body), "report body parts must be Safe HTML"
    meta = "".join(f'<div class="meta">{esc(m)}</div>' for m in header_meta)
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1>{meta}</header><nav>{nav}</nav><main>{''.join(body)}</main>"
            "<footer>dcam report \u00b7 self-contained: no scripts, no external resources</footer></body></html>\n")
