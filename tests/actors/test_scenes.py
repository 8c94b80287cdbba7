import json

import numpy as np

from dcam.actors import scenes


def test_same_seed_same_scene_and_different_seed_differs():
    a, b = scenes.make_scene(7, 3), scenes.make_scene(7, 3)
    c = scenes.make_scene(8, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_mask_pixels_are_exactly_the_drawn_object_pixels():
    # ids match the objects, bboxes match the masks, and the masked pixels carry the object's
    # saturated colour while the background around it does not (clutter is achromatic)
    for i in range(30):
        s = scenes.make_scene(11, i)
        ids = sorted(set(np.unique(s.mask)) - {0})
        assert ids == [o["id"] for o in s.objects]
        for o in s.objects:
            m = s.mask == o["id"]
            x0, y0, x1, y1 = o["bbox"]
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            # object pixels are saturated colour, background near it is not: chroma separates them
            img = s.image.astype(int)
            chroma = img.max(-1) - img.min(-1)
            ring = np.zeros_like(m)
            ring[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = True
            ring &= s.mask == 0
            assert np.median(chroma[m]) > 80
            assert np.median(chroma[ring]) < 60


def test_caption_is_left_to_right_and_names_each_object_once():
    for i in range(50):
        s = scenes.make_scene(5, i)
        xs = [(o["bbox"][0] + o["bbox"][2]) / 2 for o in s.objects]
        assert xs == sorted(xs)
        assert s.caption == " and ".join(f"a {o['colour']} {o['shape']}" for o in s.objects)
        assert 1 <= len(s.objects) <= scenes.MAX_OBJECTS
        json.loads(s.objects_json())


def test_vocabulary_sizes_and_shapes_exist():
    assert len(scenes.SHAPES) >= 5 and len(scenes.COLOURS) >= 5 and len(scenes.SIZES) >= 2
    seen = {(o["shape"], o["size"]) for i in range(200) for o in scenes.make_scene(3, i).objects}
    assert {s for s, _ in seen} == set(scenes.SHAPES)
    assert {z for _, z in seen} == set(scenes.SIZES)


def test_word_object_ids_layout():
    s = scenes.make_scene(9, 0, scenes.SceneConfig(min_objects=3, max_objects=3))
    words = s.caption.split()
    for pos, oid in scenes.word_object_ids(s.objects).items():
        assert words[pos] in s.objects[oid - 1]["words"]
