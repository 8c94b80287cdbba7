"""LLaDA-V backend: parity with the authors' code (vendored numbers: logits of the full re-encode,
every pass's canvas of generate_with_embeds incl. its stop rule, key list), trajectory and
batching. The parity model is the fixtures' tiny random configuration with the seeded weights
(real vocabulary and special ids, hidden 32, 2 blocks, a 2-layer SigLIP at 384 px, anyres_max_4).
Hooks, blanking, planted signal and loading: test_llada_family.py."""
import json

import numpy as np
import pytest
import torch
from llada_testing import REAL_IDS, fixture, llada_tokenizer, load_reference_state, native_model, reference_image
from seeded_weights import seeded_weights

from dcam.actors.models.llada_lm import map_key
from dcam.actors.models.llada_mm import prompt_ids
from dcam.actors.models.llada_v import REFERENCE_RULES, LladaVBackend

LOGITS, GENERATE, KEYS = fixture("llada_v_logits.json"), fixture("llada_v_generate.json"), fixture("llada_v_keys.json")
EOT = REAL_IDS["<|eot_id|>"]


@pytest.fixture(scope="module")
def parity():
    cfg = {**LOGITS["lm_config"], **LOGITS["mm_config"], "model_type": "llava_llada",
           "vision_config": {"num_attention_heads": LOGITS["vision_tower_config"]["num_attention_heads"]}}
    model = native_model("llada_v", cfg, tower_layers=LOGITS["vision_tower_config"]["num_hidden_layers"] - 1)
    load_reference_state("llada_v", model, seeded_weights(KEYS["shapes"], KEYS["seed"]))
    return LladaVBackend(model, llada_tokenizer(REAL_IDS), response_len=8, gen_steps=4)


@pytest.fixture(scope="module")
def batch(parity):
    s = LOGITS["samples"]
    images = [reference_image(x["image"]["width"], x["image"]["height"], x["image"]["seed"]) for x in s]
    b, errors = parity.prepare(images, [x["question"] for x in s])
    assert not errors and b.size == 2
    return b


def test_reference_keys_map_one_to_one_onto_the_native_module(parity):
    mapped = {k: map_key(k, REFERENCE_RULES) for k in KEYS["shapes"]}
    assert None not in mapped.values(), [k for k, v in mapped.items() if v is None]
    assert len(set(mapped.values())) == len(mapped)
    native = parity.model.state_dict()
    assert set(mapped.values()) == set(native)
    assert all(tuple(KEYS["shapes"][k]) == tuple(native[v].shape) for k, v in mapped.items())


def test_prompt_ids_are_the_references(parity):
    for s in LOGITS["samples"]:
        assert prompt_ids(parity.tok, s["question"]) == s["prompt_ids"]


def test_canvas_logits_match_the_reference_batched_with_left_padding(parity, batch):
    probe, tol = LOGITS["probe_ids"], LOGITS["tolerance"]
    for i, s in enumerate(LOGITS["samples"]):
        valid = batch.inputs["prefix_valid"][i]
        emb = batch.inputs["prefix_embeds"][i][valid].double()
        assert emb.shape[0] == s["prefix_len"]
        np.testing.assert_allclose(emb.sum(-1).numpy(), s["prefix_embed_row_sums"], atol=tol["embed_sums_atol"])
        for canvas, ref in zip(s["canvases"], s["canvas_logits"]):
            with torch.no_grad():
                z = parity.attribution_forward(batch, torch.tensor([i]), torch.tensor([canvas]), []).logits[0].double()
            top = z.topk(8, -1)
            assert top.indices.tolist() == ref["topk_ids"]
            np.testing.assert_allclose(top.values.numpy(), ref["topk_values"], atol=tol["logits_atol"])
            np.testing.assert_allclose(z[:, probe].numpy(), ref["probe_values"], atol=tol["logits_atol"])
            np.testing.assert_allclose(torch.logsumexp(z, -1).numpy(), ref["logsumexp"], atol=tol["logits_atol"])


def _generate(parity, batch, st):
    """generate under the run's settings (eot_boost scales the <|eot_id|> LM-head row, as the fixture did)."""
    parity.response_len, parity.gen_steps, parity.block_length = st["gen_length"], st["steps"], st["block_length"]
    head = parity.model.lm.lm_head.weight
    row = head[EOT].clone()
    try:
        with torch.no_grad():
            head[EOT] = row * st.get("eot_boost", 1.0)
        gen = parity.generate(batch)
        return gen, list(parity.last_trace)
    finally:
        with torch.no_grad():
            head[EOT] = row
        parity.response_len, parity.gen_steps, parity.block_length = 8, 4, 8


@pytest.fixture(scope="module")
def runs(parity):
    """Each fixture setting generated once, for all its samples batched (the stop runs use their own image)."""
    out = {}
    for r in GENERATE["runs"]:
        key = json.dumps(r["settings"], sort_keys=True)
        if key in out:
            continue
        group = [x for x in GENERATE["runs"] if x["settings"] == r["settings"]]
        images = [reference_image(x["image"]["width"], x["image"]["height"], x["image"]["seed"]) for x in group]
        b, errors = parity.prepare(images, [x["question"] for x in group])
        assert not errors
        out[key] = (group, b, *_generate(parity, b, r["settings"]))
    return out


def test_every_pass_reads_the_canvas_the_reference_read(parity, runs):
    """generate_with_embeds at temperature 0: the canvas of every LM pass, the returned ids (cut at
    the stop) and the number of passes, for each setting with its samples batched; the eot_boost
    runs make <|eot_id|> win at some positions so the stop rule triggers."""
    stopped = 0
    for group, b, gen, trace in runs.values():
        for i, r in enumerate(group):
            seen = [x[rows.tolist().index(i)].tolist() for rows, x in trace if i in rows.tolist()]
            assert seen == r["pass_inputs"], r["settings"]
            assert int(gen.final_step[i]) + 1 == r["n_passes"]
            n = len(r["output_ids"])
            assert gen.ids[i, :n].tolist() == r["output_ids"]
            if n < r["settings"]["gen_length"]:  # stopped: the stop token follows the returned ids
                stopped += 1
                assert int(gen.ids[i, n]) == EOT
                never = gen.commit_step[i] < 0  # after the stop, never filled: masked in every pass
                assert (gen.ids[i][never] == parity.mask_id).all() and not never[:n + 1].any()
    assert stopped >= 2


def test_each_pass_read_exactly_the_state_the_trajectory_reports(parity, runs):
    for group, b, gen, trace in runs.values():
        for s, (rows, seen) in enumerate(trace):
            assert torch.equal(gen.state_before(rows, torch.full((len(rows),), s), parity.mask_id), seen)


def test_a_batch_equals_its_samples_alone(parity, batch):
    parity.temperature = 0.7
    try:
        both = parity.generate(batch, seed=5)
        s = LOGITS["samples"][1]
        alone_b, _ = parity.prepare([reference_image(s["image"]["width"], s["image"]["height"], s["image"]["seed"])],
                                    [s["question"]])
        alone = parity.generate(alone_b, seed=5)
    finally:
        parity.temperature = 0.0
    assert torch.equal(both.ids[1], alone.ids[0]) and torch.equal(both.commit_step[1], alone.commit_step[0])


def test_forced_trajectory_commits_the_given_response(parity, batch):
    batch.given_ids = [[72, 105], [65, 66, 67]]
    try:
        gen = parity.forced_trajectory(batch)
    finally:
        batch.given_ids = [None, None]
    assert gen.ids[0, :3].tolist() == [72, 105, EOT] and gen.ids[1, :4].tolist() == [65, 66, 67, EOT]
    assert (gen.commit_step[0, :3] >= 0).all() and (gen.commit_step[1, :4] >= 0).all()


def test_image_block_values_match_the_reference_including_the_anyres_max_shrink(parity):
    """Rows of the image block (every 97th) of the reference's merge for the anyres_max_4 sizes whose
    grid is shrunk bilinearly (the logits fixture covers unshrunk grids), up to ~2 Mpx."""
    from dcam.actors.models import anyres

    table = fixture("llada_v_anyres.json")
    checked = 0
    for r in table["table"]:
        w, h = r["width"], r["height"]
        lay = parity.model.layout
        tw, th = anyres.grid_shape((w, h), lay.pinpoints, lay.tile)
        rs, cs = anyres.unpad_slices((w, h), th * 27, tw * 27)
        if anyres.anyres_max_shrink(len(range(th * 27)[rs]), len(range(tw * 27)[cs]), 27, 4) is None or w * h > 2.1e6:
            continue
        views, tiles = anyres.anyres_views(anyres.Image.fromarray(reference_image(w, h, 3)), lay.pinpoints, lay.tile)
        with torch.no_grad():
            block = parity.model.merge(parity.model.view_features(torch.from_numpy(views)), (w, h), tiles).tokens
        assert block.shape[0] == r["n_image_tokens"]
        np.testing.assert_allclose(block[::97].double().sum(-1).numpy(), r["block_row_sums_every_97"], atol=2e-4)
        checked += 1
    assert checked >= 2
