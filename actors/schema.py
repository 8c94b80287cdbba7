"""The output row and the metric names: one definition that the scorer (actors.score_stage), the
sink (pipeline.sinks), the run summary, eval-cam and the report all read.

One output row = one sample x explained token x method [x denoising step]; an input row that
failed is exactly one row with status="error" and null map/scores. Types are spelled as strings
(pipeline.sinks maps them to Arrow types) so this module imports neither pyarrow nor torch.
README.md's "Output schema" table lists the same columns (a test holds them equal).
"""
from __future__ import annotations

from typing import NamedTuple


class Column(NamedTuple):
    name: str
    type: str  # string | bool | int32 | int64 | float64 | binary | list<float32>
    meaning: str


# Scores of one map against its object's mask (actors.scores.score_map), null without a mask/object.
LOCALISATION_SCORES = ("obj_iou", "obj_iou_bestclass", "precision", "recall", "f1", "contrast", "contrast_capped",
                       "concentration", "f3", "pointing", "pointing_tol", "energy", "wrong_object")
# Faithfulness measured with the model itself (no labels needed).
FAITHFULNESS_SCORES = ("deletion_auc", "insertion_auc")
# Answer grounding, per explained token (METHOD.md §5.12): its probability with every image token
# blanked, and target_prob - blind_prob (no labels needed).
GROUNDING_SCORES = ("blind_prob", "image_reliance")
# Every float64 score column of an output row, in order.
FLOAT_SCORES = (*LOCALISATION_SCORES, "func_iou", *FAITHFULNESS_SCORES, "target_prob", *GROUNDING_SCORES)
# The per-row scores that run summaries, eval-cam and the report tabulate (means, intervals, gates).
TABLE_SCORES = ("obj_iou", "pointing", "pointing_tol", "energy", "wrong_object", "contrast", "concentration", "f3",
                *FAITHFULNESS_SCORES)
# Statistics the report computes from the map itself (no labels): mass in the top 10% cells, entropy.
MAP_STATS = ("map_top10", "map_entropy")
# For these a lower value is better (a fail-under gate fails when the value is above its threshold).
LOWER_BETTER = frozenset({"deletion_auc", "wrong_object", "map_entropy"})

_SCORE_MEANINGS = {
    "target_prob": "probability of the explained token in its attribution state",
    "blind_prob": "its probability in the same state with every image token blanked (METHOD.md §5.12)",
    "image_reliance": "target_prob - blind_prob: how much of the confidence the image supplies (METHOD.md §5.12)",
}

# Output rows of one input row are identified by these (the sink de-duplicates on them).
DEDUP_KEY = ("row_index", "method", "token_index", "step")

COLUMNS: tuple[Column, ...] = (
    Column("id", "string", "input sample id"),
    Column("shard", "string", "URL of the input shard"),
    Column("row_index", "int64", "row of the sample in its shard"),
    Column("prompt", "string", "the prompt"),
    Column("response", "string", "the explained response"),
    Column("response_source", "string", "`generated` or `given`"),
    Column("token", "string", "explained token"),
    Column("token_index", "int32", "its canvas position"),
    Column("word_type", "string", "e.g. colour/shape/function"),
    Column("object_id", "int32", "the object the word's phrase names (from `objects`, METHOD.md §5.2), null if none"),
    Column("category", "string", "the named object's category"),
    Column("method", "string", "method name (conf/run.yaml `methods`)"),
    Column("refine", "string", "enabled refinement modules (`dacg+cba+sicd`, ... or `none`)"),
    Column("hook", "string", "hook point"),
    Column("layer", "int32", "the hook's block index"),
    Column("state", "string", "attribution state (`trajectory`, `remask_target`, `teacher_forced`, `last_step`; "
                              "`trajectory_committed`: a per_step row after the commit step, the token already visible)"),
    Column("step", "int32", "denoising step of the state"),
    Column("map", "list<float32>", "refined map, row-major on the image-token grid"),
    Column("map_h", "int32", "grid rows"),
    Column("map_w", "int32", "grid columns"),
    Column("raw_map", "list<float32>", "the map before refinement"),
    *(Column(k, "float64", _SCORE_MEANINGS.get(k, "score (METHOD.md §5)")) for k in FLOAT_SCORES),
    Column("faithfulness_sampled", "bool", "curves measured for this word (probe.faithfulness_sample); "
                                           "false: not in the sample, AUCs null; null: faithfulness off"),
    Column("status", "string", "`ok` or `error`"),
    Column("error", "string", "reason (credential-free)"),
    Column("error_kind", "string", "reason class"),
    Column("notes", "string", "recorded adjustments"),
    Column("model_id", "string", "model provenance"),
    Column("config_hash", "string", "hash of the result-relevant configuration"),
    Column("probe_ms", "float64", "probe time per sample"),
    Column("refine_ms", "float64", "refine + score time per sample"),
    Column("thumbnail", "binary", "PNG <= 128 px, first row of each sample"),
    Column("mask_thumbnail", "binary", "PNG of the mask, first row of each sample"),
)
COLUMN_NAMES = tuple(c.name for c in COLUMNS)
