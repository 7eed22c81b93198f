"""Grouped-query attention: what head= means on keys and values, in the hooks and in patching.

The small llama-shaped model has 4 query heads sharing 2 key/value heads (group of 2): hook_k and
hook_v hold [batch, pos, 2, d_head], key/value head h serving query heads 2h and 2h + 1. The
references are hand computations from run_with_cache (z = pattern @ v, repeated per group), the
same model ungrouped (``set_ungroup_grouped_query_attention``: one copy of k and v per query head),
and TransformerLens' generic_activation_patch with explicit cells.
"""

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from conftest import make_model

import lenskit
from lenskit import hooks, metrics

ATOL = 1e-5
LOGIT_DIFF = metrics.logit_diff([1, 2], 5)


@pytest.fixture
def model():
    """A fresh model per test: some tests ungroup it."""
    return make_model("llama")


@pytest.fixture(scope="module")
def pair():
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 97, (2, 7), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % 97
    corrupted[:, 4] = (clean[:, 4] + 29) % 97
    return clean, corrupted


def z_by_hand(model, cache, layer, v=None):
    """hook_z [batch, pos, head, d_head] from the cached pattern and (possibly edited) values."""
    v = cache[f"blocks.{layer}.attn.hook_v"] if v is None else v
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", cache[f"blocks.{layer}.attn.hook_pattern"], v)


def test_key_value_hooks_have_one_head_per_key_value_head_unless_ungrouped(model, pair):
    clean, _ = pair
    _, cache = model.run_with_cache(clean)
    for name in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k"):
        assert cache[f"blocks.0.{name}"].shape[2] == 2
    assert cache["blocks.0.attn.hook_q"].shape[2] == cache["blocks.0.attn.hook_z"].shape[2] == 4
    assert hooks.n_key_value_heads(model) == 2
    assert [hooks.query_heads(model, h) for h in (0, 1, -1)] == [[0, 1], [2, 3], [2, 3]]
    with pytest.raises(ValueError, match=r"kv_head 2 out of range: the model has 2 key/value heads \(valid 0..1\)"):
        hooks.query_heads(model, 2)
    logits = model(clean)
    model.set_ungroup_grouped_query_attention(True)
    _, ungrouped = model.run_with_cache(clean)
    assert ungrouped["blocks.0.attn.hook_k"].shape[2] == 4 and hooks.n_key_value_heads(model) == 4
    assert hooks.query_heads(model, 3) == [3]
    torch.testing.assert_close(ungrouped["blocks.0.attn.hook_k"], cache["blocks.0.attn.hook_k"].repeat_interleave(2, 2))
    torch.testing.assert_close(model(clean), logits, atol=ATOL, rtol=0)
    split = make_model("llama", use_split_qkv_input=True)
    _, cache = split.run_with_cache(clean)
    assert cache["blocks.0.hook_k_input"].shape[2] == cache["blocks.0.hook_v_input"].shape[2] == 2
    assert cache["blocks.0.hook_q_input"].shape[2] == 4


def test_ablating_a_key_value_head_silences_exactly_its_group(model, pair):
    clean, _ = pair
    _, cache = model.run_with_cache(clean)
    h = hooks.ablate("blocks.1.attn.hook_v", head=1) + hooks.cache("blocks.1.attn.hook_z")
    h.run(model, clean)
    v = cache["blocks.1.attn.hook_v"].clone()
    v[:, :, 1] = 0
    expected = z_by_hand(model, cache, 1, v)
    torch.testing.assert_close(h.store["blocks.1.attn.hook_z"], expected, atol=ATOL, rtol=0)
    assert (expected[:, :, [2, 3]] == 0).all()  # query heads 2 and 3 read kv head 1 only
    torch.testing.assert_close(expected[:, :, [0, 1]], cache["blocks.1.attn.hook_z"][:, :, [0, 1]], atol=ATOL, rtol=0)
    # mean ablation of a kv head: the hand value of every query head of its group
    h = hooks.ablate("blocks.1.attn.hook_v", how="mean", head=0) + hooks.cache("blocks.1.attn.hook_z")
    h.run(model, clean)
    v = cache["blocks.1.attn.hook_v"].clone()
    v[:, :, 0] = v[:, :, 0].mean((0, 1), keepdim=True)
    torch.testing.assert_close(h.store["blocks.1.attn.hook_z"], z_by_hand(model, cache, 1, v), atol=ATOL, rtol=0)


def test_patching_a_key_value_head_equals_patching_its_whole_group_ungrouped(model, pair):
    """The two definitions agree: kv head h grouped = query heads 2h, 2h+1 ungrouped, patched together."""
    clean, corrupted = pair
    _, grouped_clean = model.run_with_cache(clean)
    grouped = {h: hooks.patch("blocks.1.attn.hook_k", grouped_clean, head=h).run(model, corrupted) for h in (0, 1)}
    resampled = hooks.resample("blocks.1.attn.hook_k", grouped_clean["blocks.1.attn.hook_k"][:1], head=1) + hooks.cache(
        "blocks.1.attn.hook_rot_k"
    )
    resampled.run(model, corrupted)
    groups = {h: hooks.query_heads(model, h) for h in (0, 1)}  # [0, 1] and [2, 3]
    model.set_ungroup_grouped_query_attention(True)
    _, ungrouped_clean = model.run_with_cache(clean)
    for h in (0, 1):
        ungrouped = hooks.patch("blocks.1.attn.hook_k", ungrouped_clean, head=groups[h])
        torch.testing.assert_close(ungrouped.run(model, corrupted), grouped[h], atol=ATOL, rtol=0)
    # one query head's keys alone: a different intervention, only possible ungrouped
    alone = hooks.patch("blocks.1.attn.hook_k", ungrouped_clean, head=2).run(model, corrupted)
    assert (alone - grouped[1]).abs().max() > 1e-3
    # resampling kv head 1 from a one-row source: both batch rows get that row's keys of kv head 1
    rot_k = resampled.store["blocks.1.attn.hook_rot_k"]
    torch.testing.assert_close(
        rot_k[:, :, 1], ungrouped_clean["blocks.1.attn.hook_rot_k"][:1, :, 2].expand_as(rot_k[:, :, 1])
    )


def test_head_out_of_range_on_keys_and_values_names_the_key_value_heads(model, pair):
    clean, corrupted = pair
    with pytest.raises(
        ValueError,
        match=r"hook_v: head 2 out of range: keys and values here have 2 key/value heads"
        r".*valid 0..1.*query_heads",
    ):
        hooks.ablate("blocks.0.attn.hook_v", head=2).run(model, clean)
    with pytest.raises(ValueError, match=r"hook_k: head -3 out of range: keys and values here have 2 key/value heads"):
        hooks.patch("blocks.0.attn.hook_k", torch.zeros(1, 7, 2, 8), head=-3).run(model, clean)
    with pytest.raises(
        ValueError,
        match=r"head 3 out of range for site 'k': this grouped-query model has 2 "
        r"key/value heads \(valid 0..1.*shared by 4 query heads; key/value head h is "
        r"read by query heads 2h..2h\+1.*set_ungroup_grouped_query_attention",
    ):
        lenskit.patch(model, clean, corrupted, LOGIT_DIFF, site="k", by="layer_head", heads=[0, 3], progress=False)
    hooks.ablate("blocks.0.attn.hook_z", head=3).run(model, clean)  # z has the 4 query heads
    model.set_ungroup_grouped_query_attention(True)
    hooks.ablate("blocks.0.attn.hook_v", head=3).run(model, clean)  # ungrouped: one per query head
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("site", ["k", "v"])
def test_grouped_patch_grid_is_labelled_by_key_value_head_and_equals_transformer_lens(model, pair, site):
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    bound = LOGIT_DIFF.bind(model)
    result = lenskit.patch(model, clean, corrupted, LOGIT_DIFF, site=site, by="layer_head_pos", progress=False)
    assert result.dims == ("layer", "kv_head", "pos") and result.labels["kv_head"] == [0, 1]
    function = {"k": tlp.get_act_patch_attn_head_k_by_pos, "v": tlp.get_act_patch_attn_head_v_by_pos}[site]
    expected = function(model, corrupted, clean_cache, bound).permute(0, 2, 1)  # TL 3.9: [layer, pos, kv_head]
    torch.testing.assert_close(result.tensor, expected, atol=ATOL, rtol=0)
    assert "L2 KV1" in result.plot().html and "kv_head" in result.to_frame().columns
    estimate = lenskit.attribution_patch(model, clean, corrupted, LOGIT_DIFF, site=site, by="layer_head")
    assert estimate.dims == ("layer", "kv_head") and estimate.tensor.shape == (3, 2)
    one = lenskit.patch(model, clean, corrupted, LOGIT_DIFF, site=site, by="layer_head", heads=[-1], progress=False)
    assert one.labels["kv_head"] == [1]


@pytest.mark.parametrize("site", ["k", "v"])
def test_ungrouped_patch_addresses_each_query_heads_copy(model, pair, site):
    """Ungrouped, k and v have a head per query head; TransformerLens' generic_activation_patch with the
    cells listed explicitly is the reference (its named k/v functions still stop at n_key_value_heads)."""
    clean, corrupted = pair
    model.set_ungroup_grouped_query_attention(True)
    _, clean_cache = model.run_with_cache(clean)
    bound = LOGIT_DIFF.bind(model)
    result = lenskit.patch(model, clean, corrupted, LOGIT_DIFF, site=site, by="layer_head_pos", progress=False)
    assert result.dims == ("layer", "head", "pos") and result.labels["head"] == [0, 1, 2, 3]
    cells = pd.DataFrame(
        [(layer, pos, head) for layer in range(3) for pos in range(7) for head in range(4)],
        columns=["layer", "pos", "head_index"],
    )
    expected = tlp.generic_activation_patch(
        model, corrupted, clean_cache, bound, tlp.layer_pos_head_vector_patch_setter, site, index_df=cells
    )
    torch.testing.assert_close(result.tensor, expected.view(3, 7, 4).permute(0, 2, 1), atol=ATOL, rtol=0)
    named = {"k": tlp.get_act_patch_attn_head_k_all_pos, "v": tlp.get_act_patch_attn_head_v_all_pos}[site]
    assert named(model, corrupted, clean_cache, bound).shape == (3, 2)  # TL 3.9 leaves query heads 2, 3 out
