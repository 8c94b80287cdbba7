"""dcam's own Parquet layout and img2dataset's parquet output."""
from __future__ import annotations

from typing import Iterator

from dcam.pipeline.sources.base import (
    IMAGE_URI_FIELDS,
    ShardContext,
    guarded,
    img2dataset_status_error,
    record_row_or_error,
)


def read_parquet(ctx: ShardContext) -> Iterator[dict]:
    """Stream record batches (pyarrow iter_batches) reading only the columns a raw row needs."""
    import pyarrow.parquet as pq

    with ctx.open() as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        id_f, prompt_f, resp_f = ctx.field_names()
        wanted = {id_f, prompt_f, resp_f, ctx.source.get("image_field", "image"), "mask", "objects", ctx.source.get("explain_field") or "explain",
                  "status", "error_message", *IMAGE_URI_FIELDS, "jpg", "png", "webp"}
        cols = sorted(c for c in wanted if c in names)
        batch_rows = int(ctx.source.get("batch_rows", 256))
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            for rec in batch.to_pylist():
                if ctx.spec.format == "img2dataset_parquet":
                    yield guarded(ctx, rec.get("key") if isinstance(rec.get("key"), str) else None,
                                   _img2dataset_row, rec, ctx)
                else:
                    yield record_row_or_error(rec, ctx)


def _img2dataset_row(rec: dict, ctx: ShardContext) -> dict:
    """img2dataset parquet row: failed downloads are error rows; stored bytes beat the URL."""
    row = record_row_or_error(rec, ctx)
    if row.get("status") == "error":
        return row
    status = rec.get("status")
    if status is not None and status != "success":
        return {**row, "status": "error", "error_kind": "source_status",
                "error": img2dataset_status_error(status, rec.get("error_message"))}
    data = next((rec[k] for k in ("jpg", "png", "webp") if rec.get(k)), None)
    if data is not None:
        row.update(image=bytes(data), image_uri=None)
    return row
