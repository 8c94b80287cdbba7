"""Reading a shard: its row count and its raw rows, dispatched by format."""
from __future__ import annotations

from typing import Iterator

from dcam.pipeline.sources import coco, manifests, parquet, webdataset
from dcam.pipeline.sources.base import RowError, ShardContext, ShardSpec, SourceError, finish_row, shard_error

# format -> the generator of its records (one per raw row, in file order)
READERS = {"parquet": parquet.read_parquet, "img2dataset_parquet": parquet.read_parquet,
           "webdataset": webdataset.read_webdataset, "jsonl": manifests.read_jsonl, "csv": manifests.read_csv,
           "coco": coco.read_coco}


def count_rows(spec: ShardSpec, storage_options: dict | None = None, source: dict | None = None) -> int:
    """Number of raw rows read_shard(spec) yields. Parquet: footer metadata only. Tar/jsonl/csv: one
    sequential pass over the file (no payload decoding). COCO: loads the JSON."""
    ctx = ShardContext.make(spec, storage_options, source)
    try:
        if spec.format in ("parquet", "img2dataset_parquet"):
            import pyarrow.parquet as pq

            with ctx.open() as f:
                return pq.ParquetFile(f).metadata.num_rows
        if spec.format == "coco":
            return len(coco.coco_images(coco.load_json(ctx, ctx.path)))
        if spec.format == "webdataset":
            return webdataset.count_webdataset(ctx)  # the tar's samples + the side parquet's failed URLs
        counter = {"jsonl": manifests.jsonl_lines, "csv": manifests.csv_records}[spec.format]
        return sum(1 for _ in counter(ctx, payload=False))
    except (SourceError, RowError):
        raise
    except Exception as e:  # noqa: BLE001 - shard-level failure, reported cleanly
        raise shard_error(ctx, e, "count rows of") from None


def read_shard(spec: ShardSpec, storage_options: dict | None = None, source: dict | None = None
               ) -> Iterator[dict]:
    """Stream the shard's raw rows (RAW_COLUMNS) in file order; see the module docstring for the rules.

    `source` is the config's `source` section: id_field, prompt_field, response_field (None = do not take
    it from the data), image_field, coco_images, coco_captions, batch_rows, max_member_bytes.
    Empty prompts stay empty here: DecodeStage applies `source.default_prompt` and records the note.
    """
    ctx = ShardContext.make(spec, storage_options, source)
    reader = READERS[spec.format]
    seen: dict[str, int] = {}
    try:
        for row_index, rec in enumerate(reader(ctx)):
            yield finish_row(ctx, row_index, rec, seen)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - shard-level failure (a bad row never gets here)
        raise shard_error(ctx, e, "read") from None
