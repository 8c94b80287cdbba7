"""Drawing and HTML primitives of the report: inline PNGs (base64 data URIs), map overlays on
thumbnails, histograms, and tables whose cells are escaped unless explicitly marked safe.

Escaping rule: every value that reaches the page goes through `esc` (html.escape, quotes
included) unless it is a `Safe` string built here from escaped parts. Corpus text (prompts,
responses, tokens, ids, errors, categories, shard URLs) is never marked safe.
"""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from PIL import Image

from dcam.actors.numeric import is_missing

THUMB_PX = 144


class Safe(str):
    """HTML that was built from escaped parts (emitted as is)."""


def esc(value) -> str:
    """HTML-escaped text of any value (None -> en dash)."""
    if value is None:
        return "\u2013"
    return html.escape(str(value), quote=True)


def clip_text(text, limit: int = 160) -> str | None:
    """Text shortened to `limit` characters (escape afterwards)."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def fmt(v, digits: int = 3) -> str:
    """A number for a table cell."""
    if is_missing(v):
        return "\u2013"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.{digits}f}"


def cell(v) -> str:
    """A table cell: Safe HTML as is, numbers formatted, anything else escaped."""
    if isinstance(v, Safe):
        return v
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return esc(fmt(v))
    return esc(v)


def table(headers, rows, cls: str = "") -> Safe:
    """An HTML table; headers and cells go through `cell`."""
    head = "".join(f"<th>{cell(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return Safe(f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def interval_cell(d: dict | None, key: str = "mean", signed: bool = False) -> Safe:
    """'0.412 [0.39, 0.43] n=120' as a table cell."""
    if not d or d.get(key) is None:
        return Safe(f'<span class="na">\u2013</span><small>n={esc(fmt((d or {}).get("n", 0)))}</small>')
    sign = "+" if signed else ""
    v = f"{d[key]:{sign}.3f}"
    ci = "" if d.get("lo") is None else f' <small>[{d["lo"]:{sign}.3f}, {d["hi"]:{sign}.3f}]</small>'
    return Safe(f"<b>{esc(v)}</b>{ci}<small>n={esc(fmt(d.get('n', 0)))}</small>")


def data_uri(img: Image.Image) -> str:
    """PNG data URI of a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(img: Image.Image, alt: str, cls: str = "") -> Safe:
    """<img> with the image inline as a PNG data URI (alt text escaped)."""
    return Safe(f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{data_uri(img)}">')


_LUT = None


def heat_lut() -> np.ndarray:
    """(256, 3) uint8 'turbo' colour map."""
    global _LUT
    if _LUT is None:
        import matplotlib

        _LUT = (matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _LUT


def _decode(png: bytes | None, mode: str) -> Image.Image | None:
    if not png:
        return None
    try:
        return Image.open(io.BytesIO(png)).convert(mode)
    except Exception:  # noqa: BLE001 - a broken thumbnail must not break the report
        return None


def overlay(thumb: bytes | None, values, h, w, mask: bytes | None = None, object_id=None,
            px: int = THUMB_PX, alpha: float = 0.5) -> Image.Image:
    """The map upsampled bilinearly onto the thumbnail (grey when none), with the named object's
    outline (mask pixel == object_id) in white."""
    base = _decode(thumb, "RGB") or Image.new("RGB", (px, px), (128, 128, 128))
    scale = px / max(base.size)
    size = (max(1, round(base.size[0] * scale)), max(1, round(base.size[1] * scale)))
    rgb = np.asarray(base.resize(size, Image.BILINEAR), np.float32)
    if values is not None and h and w and len(values) == h * w:
        m = np.nan_to_num(np.asarray(values, np.float32).reshape(h, w))
        m = m - m.min()
        m = m / m.max() if m.max() > 0 else m
        up = np.clip(np.asarray(Image.fromarray(m, mode="F").resize(size, Image.BILINEAR)), 0, 1)
        heat = heat_lut()[(up * 255).astype(np.uint8)].astype(np.float32)
        a = (alpha * (0.15 + 0.85 * up))[..., None]  # cold cells stay see-through
        rgb = rgb * (1 - a) + heat * a
    out = rgb.clip(0, 255).astype(np.uint8)
    obj = _decode(mask, "L")
    if obj is not None and object_id is not None:
        inside = np.asarray(obj.resize(size, Image.NEAREST)) == int(object_id)
        out[outline(inside)] = (255, 255, 255)
    return Image.fromarray(out)


MAP_PX = 192


def plain_image(thumb: bytes | None, mask: bytes | None = None, object_id=None, px: int = MAP_PX) -> Image.Image:
    """The sample's thumbnail at `px` (grey when none) with the named object's outline."""
    return overlay(thumb, None, None, None, mask, object_id, px=px)


def map_view(thumb: bytes | None, values, h, w, mask: bytes | None = None, object_id=None,
             px: int = MAP_PX) -> Image.Image:
    """The map alone, one crisp block per image-token cell (nearest upsampling, 'turbo' colours, 88%
    opaque over a grey copy of the image for orientation), with the named object's outline: legible
    where a half-transparent overlay on the photo is not."""
    base = _decode(thumb, "L")
    size = (px, px) if base is None else _fit(base.size, px)
    grey = np.asarray(base.resize(size, Image.BILINEAR).convert("RGB"), np.float32) if base is not None \
        else np.full((size[1], size[0], 3), 128, np.float32)
    if values is None or not h or not w or len(values) != h * w:
        return Image.fromarray(grey.astype(np.uint8))
    m = np.nan_to_num(np.asarray(values, np.float32).reshape(h, w))
    m = m - m.min()
    m = m / m.max() if m.max() > 0 else m
    cells = Image.fromarray((m * 255).astype(np.uint8), mode="L").resize(size, Image.NEAREST)
    heat = heat_lut()[np.asarray(cells)].astype(np.float32)
    out = (0.12 * grey + 0.88 * heat).clip(0, 255).astype(np.uint8)
    obj = _decode(mask, "L")
    if obj is not None and object_id is not None:
        out[outline(np.asarray(obj.resize(size, Image.NEAREST)) == int(object_id))] = (255, 255, 255)
    return Image.fromarray(out)


def _fit(size: tuple[int, int], px: int) -> tuple[int, int]:
    scale = px / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def outline(m: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a boolean mask: inside pixels within `width` 4-steps of the outside."""
    inner = m.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:] & inner
    return m & ~inner


def histograms(x: np.ndarray, codes: np.ndarray, names: list[str], metrics: list[str], max_groups: int = 6):
    """One PNG (PIL image) of per-row score histograms, a panel per metric, one line per group
    (matplotlib's object API on the Agg canvas: no pyplot, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = 4
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(3.3 * cols, 2.2 * rows + 0.4), dpi=80)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.95, bottom=0.1, hspace=0.5, wspace=0.22)
    for j, ax in enumerate(axes.ravel()):
        if j >= len(metrics):
            ax.axis("off")
            continue
        v = x[:, j]
        finite = v[np.isfinite(v)]
        ax.set_title(metrics[j], fontsize=9, pad=3)
        ax.set_yticks([])
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
        if not len(finite):
            ax.text(0.5, 0.5, "no values", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            continue
        lo, hi = float(finite.min()), float(finite.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for g in range(min(len(names), max_groups)):
            vg = v[(codes == g) & np.isfinite(v)]
            if len(vg):
                ax.stairs(np.histogram(vg, bins)[0], bins, linewidth=1.4, color=f"C{g}",
                          label=str(names[g]).replace("$", r"\$"))
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return Image.open(io.BytesIO(buf.getvalue()))
