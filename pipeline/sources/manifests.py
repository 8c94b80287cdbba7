"""Manifests of image URIs: JSON Lines and CSV (image_uri or url/image + prompt + optional
response/id/objects). A relative image_uri is resolved against the manifest's own directory."""
from __future__ import annotations

import csv
import io
import json
from typing import Iterator

from dcam.pipeline.sources.base import RowError, ShardContext, as_text, error_record, record_row_or_error


def jsonl_lines(ctx: ShardContext, payload: bool = True) -> Iterator[bytes]:
    """Non-blank lines (bytes), streamed; a UTF-8 BOM on the first line is dropped."""
    with ctx.open_stream() as f:
        first = True
        for line in f:
            if first:
                line, first = line.removeprefix(b"\xef\xbb\xbf"), False
            if line.strip():
                yield line


def read_jsonl(ctx: ShardContext) -> Iterator[dict]:
    for line in jsonl_lines(ctx):
        try:
            obj = json.loads(as_text(line, "line"))
        except RowError as e:
            yield error_record(e)
            continue
        except json.JSONDecodeError as e:
            yield error_record(RowError("parse", f"invalid JSON line ({e.msg} at char {e.pos})"))
            continue
        if not isinstance(obj, dict):
            yield error_record(RowError("parse", f"JSON line is a {type(obj).__name__}, expected an object"))
            continue
        yield record_row_or_error(obj, ctx)


def csv_records(ctx: ShardContext, payload: bool = True) -> Iterator[dict]:
    """csv.DictReader rows; bytes that are not UTF-8 survive as surrogates (flagged per row later)."""
    with ctx.open_stream() as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        yield from csv.DictReader(text)


def read_csv(ctx: ShardContext) -> Iterator[dict]:
    for rec in csv_records(ctx):
        if None in rec:
            yield error_record(RowError("parse", f"CSV row has {len(rec[None])} more field(s) than the header"))
            continue
        yield record_row_or_error({k: (v if v != "" else None) for k, v in rec.items()}, ctx)
