"""`dcam synth`: write a grounded-scene corpus as Parquet shards in dcam's input format."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dcam.actors import scenes

SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                    ("response", pa.string()), ("mask", pa.binary()), ("objects", pa.string())])


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def scene_table(seed: int, start: int, n: int, cfg: scenes.SceneConfig) -> pa.Table:
    rows = {k: [] for k in SCHEMA.names}
    for i in range(start, start + n):
        s = scenes.make_scene(seed, i, cfg)
        rows["id"].append(f"scene-{seed}-{i:07d}")
        rows["image"].append(png_bytes(s.image))
        rows["prompt"].append(s.prompt)
        rows["response"].append(s.caption)
        rows["mask"].append(png_bytes(s.mask))
        rows["objects"].append(s.objects_json())
    return pa.table(rows, schema=SCHEMA)


def write_corpus(output: str, n: int, seed: int, shard_size: int, scene_cfg: scenes.SceneConfig,
                 storage_options: dict | None = None, with_response: bool = True) -> list[str]:
    """Shards shard-00000.parquet, ... under `output` (any fsspec URL). Same arguments give
    byte-identical files. Returns the shard URLs."""
    from dcam.pipeline.storage import open_fs

    fs, root = open_fs(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    urls = []
    for k, start in enumerate(range(0, n, shard_size)):
        table = scene_table(seed, start, min(shard_size, n - start), scene_cfg)
        if not with_response:
            table = table.drop(["response"])
        path = f"{root.rstrip('/')}/shard-{k:05d}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd", write_statistics=False)
        urls.append(fs.unstrip_protocol(path) if "://" in output else path)
    return urls
