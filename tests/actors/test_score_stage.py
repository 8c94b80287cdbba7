"""RefineScoreStage: which object each explained word is scored against (METHOD.md §5.2) and
the tolerant-pointing radius it scores with (§5.8), on hand-built probe payloads."""
from __future__ import annotations

import json
import pickle

import numpy as np

from dcam.actors.score_stage import WRONG_WORD, RefineScoreStage, phrase_objects, response_phrases, word_objects

METHOD = {"m": {"preset": "diffusion_cam_raw"}}  # no refinement: the row's map is the raw map


def obj(k: int, colour: str, shape: str) -> dict:
    return {"id": k, "words": [colour, shape], "category": shape}


def stage_rows(tokens: list[str], objects: list[dict], mask: np.ndarray, maps: dict[int, np.ndarray],
               with_tokens: bool = True) -> list[dict]:
    """Output records of one sample whose response is `tokens`; maps: explained position -> map."""
    ids = [hash(t) % 1000 for t in tokens]
    payload = dict(prompt="p", response=" ".join(tokens), response_ids=ids, canvas_ids=[*ids, 1000], eos_id=1000,
                   response_source="given",
                   methods={"m": dict(hook="blocks.1", state="trajectory", variant="grad_norm", contrast="logit")},
                   maps={"m": [dict(position=p, token_id=ids[p], token=tokens[p], step=0, raw_map=m.astype(np.float32),
                                    target_prob=0.5, deletion_auc=float("nan"), insertion_auc=float("nan"),
                                    word_type="shape") for p, m in maps.items()]})
    if with_tokens:
        payload["response_tokens"] = tokens
    h, w = mask.shape
    batch = {"id": np.array(["s0"], dtype=object), "shard": np.array(["x.parquet"], dtype=object),
             "row_index": np.array([0]), "status": np.array(["ok"], dtype=object),
             "error": np.array([None], dtype=object), "error_kind": np.array([None], dtype=object),
             "payload": np.array([pickle.dumps(payload)], dtype=object), "notes": np.array([""], dtype=object),
             "prompt": np.array(["p"], dtype=object), "probe_ms": np.array([1.0]),
             "height": np.array([h]), "width": np.array([w]),
             "mask_pixels": np.array([mask.astype("<u2").tobytes()], dtype=object),
             "objects": np.array([json.dumps(objects)], dtype=object)}
    out = RefineScoreStage(METHOD, {"thumbnails": False})(batch)
    return pickle.loads(out["records"][0])


def three_object_scene():
    """Green square (1), green triangle (2), blue square (3), left to right on a 16 x 48 image."""
    mask = np.zeros((16, 48), np.uint8)
    mask[4:12, 2:14], mask[4:12, 18:30], mask[4:12, 34:46] = 1, 2, 3
    return mask, [obj(1, "green", "square"), obj(2, "green", "triangle"), obj(3, "blue", "square")]


def peak_on(mask: np.ndarray, k: int, grid=(4, 12)) -> np.ndarray:
    """A grid map whose only hot cell lies inside object k."""
    ys, xs = np.nonzero(mask == k)
    m = np.zeros(grid, np.float32)
    m[int(ys.mean()) * grid[0] // mask.shape[0], int(xs.mean()) * grid[1] // mask.shape[1]] = 1.0
    return m


# ----------------------------------------------------------------------------- issue 13 defect 2

def test_a_wrong_word_is_not_scored_against_the_next_object_and_the_next_word_keeps_its_object():
    """'a green square and a green square and a blue square' for a green square, a green triangle
    and a blue square: the second "square" (in the triangle's place) is a wrong word, scored against
    no object; the third (right) is scored against the blue square. Old rule (k-th occurrence ->
    k-th candidate): 1, 3, None."""
    mask, objects = three_object_scene()
    tokens = "a green square and a green square and a blue square".split()
    rows = stage_rows(tokens, objects, mask, {2: peak_on(mask, 1), 6: peak_on(mask, 3), 10: peak_on(mask, 3)})
    by_pos = {r["token_index"]: r for r in rows}
    assert [by_pos[p]["object_id"] for p in (2, 6, 10)] == [1, None, 3]
    assert by_pos[6]["obj_iou"] is None and by_pos[6]["pointing"] is None  # a wrong word is not scored
    assert WRONG_WORD in by_pos[6]["notes"] and WRONG_WORD not in by_pos[10]["notes"]
    assert by_pos[10]["pointing"] == 1.0 and by_pos[10]["wrong_object"] == 0.0
    assert by_pos[2]["pointing"] == 1.0


def words(response: str, objects: list[dict]) -> list:
    """Object id (or None) of every word inside an object phrase, in response order."""
    got = word_objects(response.split(), objects)
    return [None if got[p] is None else got[p]["id"] for p in sorted(got)]


def test_phrases_follow_caption_order_then_the_object_they_name():
    _, objects = three_object_scene()
    assert response_phrases("a green square and a blue square .".split(), objects) == [[1, 2], [5, 6]]
    assert words("a green square and a green triangle and a blue square", objects) == [1, 1, 2, 2, 3, 3]
    # the example: phrase 2 sits in the triangle's place; its "green" is right, its "square" wrong
    assert words("a green square and a green square and a blue square", objects) == [1, 1, 2, None, 3, 3]
    # out of caption order, every phrase still names an object: each word gets the object it names
    assert words("a blue square and a green square and a green triangle", objects) == [3, 3, 1, 1, 2, 2]
    assert words("a green and a green and a blue", objects) == [1, 2, 3]  # partial phrases, caption order
    # one triangle, named in the 2nd place: the 1st phrase falls back to the 1st object, whose shape differs
    assert words("a green triangle and a green triangle", objects) == [1, None, 2, 2]
    # a phrase beyond the last object names none
    assert words("a green square and a green triangle and a blue square and a blue square", objects) == \
        [1, 1, 2, 2, 3, 3, None, None]
    two = [obj(1, "blue", "square"), obj(2, "green", "square")]
    assert words("a green square and a green square", two) == [None, 1, 2, 2]  # caption order beats naming
    assert [o["id"] for _, o in phrase_objects("a green square and a blue square".split(), two)] == [2, 1]


def test_coco_style_objects_in_annotation_order_are_found_by_name():
    """COCO lists objects in annotation order, not in the caption's: each phrase finds the object it names."""
    objects = [{"id": 1, "words": ["cat"]}, {"id": 2, "words": ["dog"]}, {"id": 3, "words": ["traffic", "light"]}]
    assert words("a dog chasing a cat near a traffic light", objects) == [2, 1, 3, 3]


def test_punctuation_and_case_and_subword_spaces_are_ignored():
    _, objects = three_object_scene()
    toks = [" A", " Green", " square,", " and", " a", " BLUE", " square."]
    assert [o["id"] for _, o in phrase_objects(toks, objects)] == [1, 3]


def test_payload_without_token_strings_aligns_on_the_explained_tokens():
    mask, objects = three_object_scene()
    tokens = "a green square and a green square and a blue square".split()
    rows = stage_rows(tokens, objects, mask, {2: peak_on(mask, 1), 6: peak_on(mask, 3), 10: peak_on(mask, 3)},
                      with_tokens=False)
    assert [r["object_id"] for r in sorted(rows, key=lambda r: r["token_index"])] == [1, None, 3]


# ----------------------------------------------------------------------------- issue 13 defect 4

def test_tolerant_pointing_on_a_non_square_image_uses_the_one_radius_rule():
    """64 x 128 image, 4 x 4 grid: cells are 16 x 32 px, the radius is max(16, 32) / 2 = 16 px.
    The map's peak (pixel (23, 47)) is 12 px right of the object (columns 0..35): inside 16 px,
    outside the 8 px that the old pipeline rule (mask height / map height) gave."""
    from dcam.actors.scores import score_map, token_cell_px

    mask = np.zeros((64, 128), np.uint8)
    mask[:, :36] = 1
    m = np.zeros((4, 4), np.float32)
    m[1, 1] = 1.0
    assert token_cell_px(mask.shape, m.shape) == 32.0
    row = stage_rows(["a", "green", "square"], [obj(1, "green", "square")], mask, {2: m})[0]
    assert row["object_id"] == 1 and row["pointing"] == 0.0
    assert row["pointing_tol"] == 1.0
    assert row["pointing_tol"] == score_map(m, mask, 1)["pointing_tol"]  # same rule as the library default
    assert score_map(m, mask, 1, grid_cell_px=16.0)["pointing_tol"] == 0.0  # the old rule's radius misses
    tall = stage_rows(["a", "green", "square"], [obj(1, "green", "square")], mask.T.copy(), {2: m.T.copy()})[0]
    assert tall["pointing_tol"] == 1.0  # transposed image: same answer whichever side is longer
