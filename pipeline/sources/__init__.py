"""Input shards: listing (`list_shards`), row counts (`count_rows`) and streaming readers
(`read_shard`) that turn every supported input format into *raw rows* (docs/ARCHITECTURE.md).

Formats (one ShardSpec = one file):
  parquet              dcam's own layout (`dcam synth`): id, image (bytes) or image_uri, prompt,
                       optional response, mask (PNG bytes), objects (JSON string).
  img2dataset_parquet  img2dataset's parquet: key, url, caption, status, error_message, optional jpg/png/webp
                       bytes. Rows whose status is not "success" become error rows (kind "source_status").
  webdataset           img2dataset tar shards: <key>.jpg|.png|.webp + <key>.txt + <key>.json (optionally
                       <key>.mask.png + <key>.objects.json). Read with tarfile in streaming mode. The side
                       parquet img2dataset writes beside each tar (same stem) adds one "source_status" error
                       row per failed URL, after the tar's rows (count_rows includes them).
  jsonl, csv           manifests: image_uri (or url/image) + prompt + optional response/id/objects. A relative
                       image_uri is resolved against the manifest's own directory.
  coco                 one instances JSON; images under `source.coco_images` (default: the JSON's
                       directory); masks rasterised from polygons/RLE; `source.coco_captions` (a captions
                       JSON) gives `response` (first caption of each image, file order).

Row contract details decided here:
  * Rows come out in file order; row_index is 0..n-1 and n == count_rows(spec) (error rows included).
  * A row that cannot be parsed becomes an error row (status "error", `error`, and an extra `error_kind`
    column); readers never raise for a bad row. Shard-level failures (missing file, corrupt footer/tar,
    malformed CSV quoting) raise SourceError from both count_rows and read_shard.
  * Text fields stored as bytes (a binary parquet column, tar members, jsonl lines, csv) are decoded as
    strict UTF-8; invalid UTF-8 makes the row an error row with error_kind "encoding" (no silent
    replacement: a replaced prompt would change what the model is asked).
  * Duplicate ids: the first occurrence of an id in a shard is kept; every later occurrence becomes an
    error row with error_kind "duplicate_id" naming the first row_index. Ids are not compared across shards.
  * A missing id gets a deterministic one: "<shard_key>-<row_index>".
  * Error rows carry no image/mask payload (image=None, mask=None) but keep id/prompt where known.

Modules: base (shared helpers and the raw-row completion), listing, read (dispatch by format), and
one module per format: parquet (dcam + img2dataset parquet), webdataset, manifests (jsonl, csv), coco.
"""
from dcam.pipeline.sources.base import (
           FORMATS,
           RAW_COLUMNS,
           RowError,
           ShardSpec,
           SourceError,
           make_shard_key,
           shard_spec,
)
from dcam.pipeline.sources.listing import list_shards
from dcam.pipeline.sources.read import count_rows, read_shard

__all__ = ["FORMATS", "RAW_COLUMNS", "RowError", "ShardSpec", "SourceError", "count_rows", "list_shards",
           "make_shard_key", "read_shard", "shard_spec"]
