"""LaViDa-LLaDA backend: parity with the authors' code (vendored numbers), key mapping, the
trajectory and the prefix cache. The parity model is the fixtures' tiny random configuration with
the seeded weights (real vocabulary and special ids, d_model 32, 2 blocks, a 2-layer SigLIP at
384 px). Hooks, blanking, planted signal and loading: test_llada_family.py."""
import ast

import numpy as np
import pytest
import torch
from llada_testing import (
    REAL_IDS,
    fixture,
    lavida_config,
    llada_tokenizer,
    load_reference_state,
    native_model,
    reference_image,
    seeded_reference_state,
)
from seeded_weights import seeded_weights

from dcam.actors.models.lavida import REFERENCE_RULES, LavidaBackend, transfer_counts
from dcam.actors.models.llada_lm import map_key
from dcam.actors.models.llada_mm import prompt_ids

LOGITS, GENERATE, KEYS = fixture("lavida_logits.json"), fixture("lavida_generate.json"), fixture("lavida_keys.json")


def _parity_config() -> dict:
    return {**LOGITS["llada_config"], **LOGITS["mm_config"], "model_type": "llava_llada",
            "vision_config": {"num_attention_heads": LOGITS["vision_tower_config"]["num_attention_heads"]}}


@pytest.fixture(scope="module")
def parity():
    """The fixtures' model: reference shapes, seeded weights, mapped onto the native module."""
    model = native_model("lavida", _parity_config(), tower_layers=LOGITS["vision_tower_config"]["num_hidden_layers"] - 1)
    load_reference_state("lavida", model, seeded_weights(KEYS["shapes"], KEYS["seed"]))
    return LavidaBackend(model, llada_tokenizer(REAL_IDS), response_len=8, temperature=0.0)


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
    assert len(set(mapped.values())) == len(mapped)  # injective
    native = parity.model.state_dict()
    assert set(mapped.values()) == set(native)  # and onto
    assert all(tuple(KEYS["shapes"][k]) == tuple(native[v].shape) for k, v in mapped.items())
    n_blocks = KEYS["llada_config"]["n_layers"]
    assert KEYS["key_patterns"]["model.transformer.blocks.{i}.attn_out.weight"] == n_blocks


def test_prompt_ids_are_the_references(parity):
    for s in LOGITS["samples"]:
        assert prompt_ids(parity.tok, s["question"]) == s["prompt_ids"]


def test_canvas_logits_match_the_reference_batched_with_left_padding(parity, batch):
    """The two samples (prefixes of 1077 and 823 tokens) in one left-padded batch reproduce the
    reference's batch-1 numbers: prefix embeddings, then the cached-step logits of two canvases."""
    probe = LOGITS["probe_ids"]
    tol = LOGITS["tolerance"]
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


def _configure(be, st):
    be.response_len, be.block_length, be.step_ratio = st["max_new_tokens"], st["block_length"], st["step_ratio"]
    be.schedule, be.temperature = st["schedule"], st["temperature"]
    be.shift = float((st.get("schedule_kwargs") or {}).get("shift", 3))


@pytest.mark.parametrize("k", range(4))
def test_commit_order_matches_the_reference_generate(parity, batch, k):
    """Temperature 0 (three schedules) and seeded Gumbel sampling at 0.1: ids, per-position commit
    step and number of passes of the reference's generate(prefix_lm=True), for both samples batched."""
    st = GENERATE["runs"][k]["settings"]
    _configure(parity, st)
    try:
        gen = parity.generate(batch, seed=st.get("seed", 0))
    finally:
        _configure(parity, dict(max_new_tokens=8, block_length=8, step_ratio=0.5, schedule="shift", temperature=0.0))
    questions = [s["question"] for s in LOGITS["samples"]]
    runs = [r for r in GENERATE["runs"] if r["settings"] == st]
    assert len(runs) == 2
    for r in runs:
        i = questions.index(r["question"])
        assert gen.n_steps == r["n_passes"]
        assert gen.ids[i].tolist() == r["ids"]
        assert gen.commit_step[i].tolist() == r["commit_step"]


def test_transfer_schedules_match_the_reference():
    for key, counts in GENERATE["transfer_schedules"].items():
        L, steps, schedule, kwargs = key.split(",", 3)
        kw = ast.literal_eval(kwargs.split("=", 1)[1])  # None or a small dict literal
        sch = schedule.split("=")[1]
        got = transfer_counts(int(L.split("=")[1]), int(steps.split("=")[1]), None if sch == "None" else sch,
                              float((kw or {}).get("shift", 3)))
        assert got == counts, key


def test_each_pass_read_exactly_the_state_the_trajectory_reports(parity, batch):
    gen = parity.generate(batch)
    assert len(parity.last_trace) == gen.n_steps
    assert ((gen.commit_step >= 0) & (gen.commit_step < gen.n_steps)).all()
    for s, seen in enumerate(parity.last_trace):
        state = gen.state_before(torch.arange(2), torch.full((2,), s), parity.mask_id)
        assert torch.equal(state, seen)


def test_attribution_pass_equals_the_cached_generation_step(parity, batch):
    """One [prefix | canvas] pass under the prefix-DLM mask gives the logits of the cached step."""
    canvas = torch.tensor([[parity.mask_id, 65, parity.mask_id, 66, 67, parity.mask_id, parity.mask_id, 68]] * 2)
    with torch.no_grad():
        cached = parity.cached_canvas_logits(parity.prefix_context(batch), canvas)
        single = parity.attribution_forward(batch, torch.arange(2), canvas, []).logits
    torch.testing.assert_close(single, cached, atol=2e-5, rtol=0)


def test_a_batch_equals_its_samples_alone_with_seeded_sampling(parity, batch):
    _configure(parity, dict(max_new_tokens=8, block_length=8, step_ratio=0.5, schedule="shift", temperature=0.5))
    try:
        both = parity.generate(batch, seed=11)
        s = LOGITS["samples"][1]
        alone_b, _ = parity.prepare([reference_image(s["image"]["width"], s["image"]["height"], s["image"]["seed"])],
                                    [s["question"]])
        alone = parity.generate(alone_b, seed=11)
    finally:
        _configure(parity, dict(max_new_tokens=8, block_length=8, step_ratio=0.5, schedule="shift", temperature=0.0))
    assert torch.equal(both.ids[1], alone.ids[0]) and torch.equal(both.commit_step[1], alone.commit_step[0])


def test_seeded_reference_state_round_trips():
    model = native_model("lavida", lavida_config())
    state = seeded_reference_state("lavida", model, 5)
    load_reference_state("lavida", model, state)
    assert all(k.startswith(("model.transformer.", "model.vision_tower.vision_tower.vision_model.",
                             "model.mm_projector.", "model.image_newline")) for k in state)
