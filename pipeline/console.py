"""What commands print: one JSON object with --json, else a plain-text table; logs go to stderr."""
from __future__ import annotations

import json
import numbers
import sys

from dcam.actors.numeric import finite_or_none


def log(message: str) -> None:
    """Progress and diagnostics: stderr, flushed (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)


def emit(result: dict, as_json: bool, text: str | None = None) -> None:
    """A command's figures: one JSON object with --json, else `text` (or indented JSON)."""
    if as_json:
        print(json.dumps(result, default=float))
    else:
        print(text if text is not None else json.dumps(result, indent=1, default=float))


def format_table(labels: list[tuple[str, int]], columns: list[str], rows: list[dict], width: int = 9,
                 digits: int = 3, indent: str = "") -> str:
    """A fixed-width text table. `labels`: (key, width) of the left-aligned text columns; `columns`:
    numeric columns (header cut to `width`); a missing (None/NaN) number prints as '-'."""
    head = " ".join(f"{k:{w}s}" for k, w in labels) + " " + " ".join(f"{c[:width]:>{width}s}" for c in columns)
    lines = [indent + head, indent + "-" * len(head)]
    for r in rows:
        text = " ".join(f"{str(r[k]):{w}s}" for k, w in labels)
        cells = " ".join(_cell(r.get(c), width, digits) for c in columns)
        lines.append(f"{indent}{text} {cells}")
    return "\n".join(lines)


def _cell(v, width: int, digits: int) -> str:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):  # counts (rows) print as integers
        return f"{int(v):>{width}d}"
    f = finite_or_none(v) if isinstance(v, numbers.Real) else None
    return f"{'-':>{width}s}" if f is None else f"{f:{width}.{digits}f}"


def progress_line(done: int, total: int, ok: int, rate: float | None) -> str:
    """'120/512 rows (118 ok), 4.1 rows/s, ETA 1m36s' (no ETA until a rate is known)."""
    line = f"{done}/{total} rows ({ok} ok)"
    if rate:
        line += f", {rate:.1f} rows/s"
        if done < total:
            line += f", ETA {format_duration((total - done) / rate)}"
    return line


def format_duration(seconds: float) -> str:
    """45s, 3m05s, 2h07m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
