"""The hook vocabulary, each factory checked against a hand computation."""

import einops
import pytest
import torch
from conftest import make_model

from lenskit import hooks

pytestmark = pytest.mark.both_backends


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2")


@pytest.fixture(scope="module")
def clean_cache(model, tokens):
    return model.run_with_cache(tokens)


def manual_forward(model, tokens, skip_attn=(), skip_mlp=()):
    """The model's forward pass, block by block, leaving out the named sublayers."""
    x = model.embed(tokens) + model.pos_embed(tokens)
    for layer, block in enumerate(model.blocks):
        if layer not in skip_attn:
            x = x + block.attn(block.ln1(x), block.ln1(x), block.ln1(x))
        if layer not in skip_mlp:
            x = x + block.mlp(block.ln2(x))
    return model.unembed(model.ln_final(x))


def test_hooks_are_plain_transformerlens_pairs(model, tokens, clean_cache):
    logits, cache = clean_cache
    store_hooks = hooks.cache("blocks.1.hook_resid_pre")
    assert isinstance(store_hooks, list) and isinstance(store_hooks[0], tuple)
    out = model.run_with_hooks(tokens, fwd_hooks=store_hooks)
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    torch.testing.assert_close(store_hooks.store["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre"])
    with model.hooks(fwd_hooks=store_hooks):
        model(tokens[:1])
    assert store_hooks.store["blocks.1.hook_resid_pre"].shape[0] == 1


def test_cache_glob_list_filter_device_dtype(model, tokens, clean_cache):
    _, cache = clean_cache
    glob = hooks.cache("blocks.*.hook_resid_post", dtype=torch.float16)
    listed = hooks.cache(["blocks.0.attn.hook_pattern", "hook_embed"])
    filtered = hooks.cache(lambda name: name.endswith("mlp.hook_post"), device="cpu")
    (glob + listed + filtered).run(model, tokens)
    assert sorted(glob.store) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert glob.store["blocks.2.hook_resid_post"].dtype == torch.float16
    torch.testing.assert_close(
        glob.store["blocks.2.hook_resid_post"].float(), cache["blocks.2.hook_resid_post"], rtol=1e-3, atol=1e-2
    )
    torch.testing.assert_close(listed.store["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_pattern"])
    assert sorted(filtered.store) == [f"blocks.{i}.mlp.hook_post" for i in range(3)]
    assert not listed.store["hook_embed"].requires_grad


def test_compose_keeps_order_and_single_store(model, tokens):
    calls = []
    first = hooks.Hooks([("blocks.0.hook_resid_pre", lambda a, hook: calls.append("first"))])
    second = hooks.Hooks([("blocks.0.hook_resid_pre", lambda a, hook: calls.append("second"))])
    both = first + hooks.cache("hook_embed") + second
    assert both.store is not None and list(both.store) == []
    both.run(model, tokens)
    assert calls == ["first", "second"] and "hook_embed" in both.store
    assert (hooks.cache("hook_embed") + hooks.cache("hook_pos_embed")).store is None


def test_zero_ablating_a_head_equals_recomputing_the_layer_without_it(model, tokens, clean_cache):
    _, cache = clean_cache
    layer, head = 1, 2
    ablated = hooks.ablate(f"blocks.{layer}.attn.hook_z", head=head) + hooks.cache(f"blocks.{layer}.hook_attn_out")
    ablated.run(model, tokens)
    attn = model.blocks[layer].attn
    z = cache[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
    keep = [h for h in range(model.cfg.n_heads) if h != head]
    by_hand = einops.einsum(z[:, :, keep], attn.W_O[keep], "b p h d, h d m -> b p m") + attn.b_O
    torch.testing.assert_close(ablated.store[f"blocks.{layer}.hook_attn_out"], by_hand, atol=1e-5, rtol=1e-5)


def test_mean_ablating_a_neuron_changes_mlp_out_by_its_weight_row(model, tokens, clean_cache):
    _, cache = clean_cache
    layer, neuron, pos = 0, 5, 3
    post = cache[f"blocks.{layer}.mlp.hook_post"]  # [batch, pos, d_mlp]
    h = hooks.ablate(f"blocks.{layer}.mlp.hook_post", how="mean", neuron=neuron, pos=pos) + hooks.cache(
        f"blocks.{layer}.hook_mlp_out"
    )
    h.run(model, tokens)
    mean = post[:, :, neuron].mean()
    expected = cache[f"blocks.{layer}.hook_mlp_out"].clone()
    expected[:, pos] += (mean - post[:, pos, neuron])[:, None] * model.blocks[layer].mlp.W_out[neuron]
    torch.testing.assert_close(h.store[f"blocks.{layer}.hook_mlp_out"], expected, atol=1e-5, rtol=1e-5)


def test_mean_ablation_from_another_run_over_batch_only(model, tokens, clean_cache):
    _, cache = clean_cache
    other = torch.randn_like(cache["blocks.1.hook_resid_pre"])
    h = hooks.ablate("blocks.1.hook_resid_pre", how="mean", mean_from=other, mean_over="batch") + hooks.cache(
        "blocks.1.hook_resid_pre"
    )
    h.run(model, tokens)
    expected = other.mean(0, keepdim=True).expand_as(other)
    torch.testing.assert_close(h.store["blocks.1.hook_resid_pre"], expected)


def test_resample_draws_seeded_rows_of_the_source(model, tokens):
    source = torch.randn(5, tokens.shape[1], model.cfg.n_heads, model.cfg.d_head)
    h = hooks.resample("blocks.0.attn.hook_z", source, head=1, seed=3) + hooks.cache("blocks.0.attn.hook_z")
    h.run(model, tokens)
    got = h.store["blocks.0.attn.hook_z"]
    rows = torch.randint(5, (tokens.shape[0],), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got[:, :, 1], source[rows, :, 1])
    again = hooks.resample("blocks.0.attn.hook_z", source, head=1, seed=3) + hooks.cache("blocks.0.attn.hook_z")
    again.run(model, tokens)
    torch.testing.assert_close(again.store["blocks.0.attn.hook_z"], got, rtol=0, atol=0)


def test_patching_everything_at_the_embedding_gives_the_clean_run(model, tokens, clean_cache):
    clean_logits, cache = clean_cache
    corrupted = tokens.flip(1)
    out = model.run_with_hooks(corrupted, fwd_hooks=hooks.patch("blocks.0.hook_resid_pre", cache))
    torch.testing.assert_close(out, clean_logits)


def test_patching_one_position_leaves_earlier_positions_alone(model, tokens, clean_cache):
    _, cache = clean_cache
    corrupted = tokens.flip(1)
    corrupted_logits = model(corrupted)
    pos = 6
    h = hooks.patch("blocks.1.hook_resid_pre", cache["blocks.1.hook_resid_pre"], pos=pos) + hooks.cache(
        "blocks.1.hook_resid_pre"
    )
    out = h.run(model, corrupted)
    torch.testing.assert_close(out[:, :pos], corrupted_logits[:, :pos])
    assert not torch.allclose(out[:, pos], corrupted_logits[:, pos])
    torch.testing.assert_close(h.store["blocks.1.hook_resid_pre"][:, pos], cache["blocks.1.hook_resid_pre"][:, pos])


def test_patch_from_a_cache_with_a_glob_patches_every_layer(model, tokens, clean_cache):
    clean_logits, cache = clean_cache
    out = hooks.patch("blocks.*.hook_resid_post", cache).run(model, tokens.flip(1))
    torch.testing.assert_close(out, clean_logits)


def test_add_steers_selected_positions(model, tokens, clean_cache):
    _, cache = clean_cache
    vector = torch.randn(model.cfg.d_model)
    h = hooks.add("blocks.2.hook_resid_pre", vector, pos=[0, -1], scale=2.5) + hooks.cache("blocks.2.hook_resid_pre")
    h.run(model, tokens)
    expected = cache["blocks.2.hook_resid_pre"].clone()
    expected[:, [0, -1]] += 2.5 * vector
    torch.testing.assert_close(h.store["blocks.2.hook_resid_pre"], expected)


@pytest.mark.needs_tl3(
    "its reference (conftest.blocks_by_hand) calls HookedTransformer's embed, pos_embed and blocks, which are Hugging Face modules with other signatures on the bridge"
)
def test_skip_equals_leaving_blocks_out_by_hand(model, tokens):
    with torch.no_grad():
        torch.testing.assert_close(
            hooks.skip(model, 1).run(model, tokens),
            manual_forward(model, tokens, skip_attn=[1], skip_mlp=[1]),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            hooks.skip(model, [0, 2], part="attn").run(model, tokens),
            manual_forward(model, tokens, skip_attn=[0, 2]),
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            hooks.skip(model, -1, part="mlp").run(model, tokens),
            manual_forward(model, tokens, skip_mlp=[2]),
            atol=1e-5,
            rtol=1e-5,
        )


def test_skipped_block_passes_the_residual_through_exactly(model, tokens):
    h = hooks.skip(model, 1) + hooks.cache(["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
    h.run(model, tokens)
    assert torch.equal(h.store["blocks.1.hook_resid_pre"], h.store["blocks.1.hook_resid_post"])


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_skip_on_other_architectures(kind, tokens):
    model = make_model(kind)
    h = hooks.skip(model, 0) + hooks.cache(["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])
    h.run(model, tokens)
    assert torch.equal(h.store["blocks.0.hook_resid_pre"], h.store["blocks.0.hook_resid_post"])


def greedy(model, tokens, steps, fwd_hooks=()):
    """Greedy continuation by repeated full forwards (the independent reference for generate)."""
    for _ in range(steps):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize(
    "make_hooks",
    [
        lambda model: hooks.skip(model, 1),
        lambda model: hooks.add("blocks.1.hook_resid_pre", torch.ones(model.cfg.d_model)),
        lambda model: hooks.ablate("blocks.0.attn.hook_z", head=[0, 3]),
        lambda model: hooks.ablate("blocks.2.mlp.hook_post", how="mean", neuron=4),
    ],
    ids=["skip", "add", "ablate_head", "mean_ablate_neuron"],
)
@pytest.mark.parametrize("kind, kv_cache", [("llama", True), ("gpt2", False)])
def test_factories_work_under_generate(kind, kv_cache, tokens, make_hooks):
    # TransformerLens 3.9's cached generate misplaces absolute positional embeddings after the
    # first new token, so GPT-2-shaped models are checked without the kv cache.
    model = make_model(kind)
    h = make_hooks(model)
    prompt = tokens[:1, :5]
    with h.on(model):
        generated = model.generate(
            prompt, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=kv_cache
        )
    torch.testing.assert_close(generated, greedy(model, prompt, 4, h))
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_position_hooks_under_generate_without_kv_cache(model, tokens):
    prompt = tokens[:1, :5]
    steer = hooks.add("blocks.0.hook_resid_pre", torch.ones(model.cfg.d_model), pos=2)
    with steer.on(model):
        generated = model.generate(
            prompt, max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False, use_past_kv_cache=False
        )
    torch.testing.assert_close(generated, greedy(model, prompt, 3, steer))


def test_patch_source_must_fit_the_activation(model, tokens):
    source = torch.zeros(1, 5, model.cfg.d_model)
    with pytest.raises(ValueError, match=r"source shape \(1, 5, 32\) does not match the activation shape \(1, 6, 32\)"):
        hooks.patch("blocks.0.hook_resid_pre", source, pos=2).run(model, tokens[:1, :6])


def test_unknown_hook_name_suggests_close_ones(model, tokens):
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.1.hook_resid_pr'.*blocks.1.hook_resid_pre"):
        hooks.cache("blocks.1.hook_resid_pr").run(model, tokens)
    with pytest.raises(ValueError, match="matches no hook"):
        hooks.cache("blocks.*.hook_nothing").validate(model)
    with pytest.raises(ValueError, match="unknown hook name"):
        hooks.patch("blocks.9.hook_resid_pre", {}).validate(model)


@pytest.mark.parametrize(
    "bad_hooks, message",
    [
        (lambda m: hooks.ablate("blocks.0.attn.hook_z", head=4), r"head 4 out of range.*valid 0..3"),
        (lambda m: hooks.ablate("blocks.0.attn.hook_pattern", head=-5), r"head -5 out of range"),
        (lambda m: hooks.ablate("blocks.0.hook_resid_pre", pos=10), r"pos 10 out of range.*valid 0..9"),
        (lambda m: hooks.ablate("blocks.0.mlp.hook_post", neuron=64), r"neuron 64 out of range.*valid 0..63"),
        (lambda m: hooks.ablate("blocks.0.hook_resid_pre", head=0), r"has no head dimension"),
        (lambda m: hooks.ablate("blocks.0.attn.hook_pattern", neuron=0), r"neuron= does not apply"),
        (lambda m: hooks.add("blocks.0.hook_resid_pre", torch.ones(7)), r"does not broadcast"),
        (lambda m: hooks.resample("blocks.0.hook_resid_pre", torch.ones(2, 4, 32)), r"does not fit"),
    ],
    ids=["head", "pattern_head", "pos", "neuron", "no_head_dim", "pattern_neuron", "add_shape", "resample_shape"],
)
def test_bad_indices_raise_and_leave_no_hook(model, tokens, bad_hooks, message):
    existing = ("blocks.0.hook_resid_post", lambda act, hook: None)
    model.add_hook(*existing)
    try:
        with pytest.raises(ValueError, match=message):
            bad_hooks(model).run(model, tokens)
        with pytest.raises(ValueError, match=message):
            model.run_with_hooks(tokens, fwd_hooks=bad_hooks(model))
        attached = {hp.name: len(hp.fwd_hooks) for hp in model.hook_dict.values() if hp.fwd_hooks}
        assert attached == {"blocks.0.hook_resid_post": 1}  # the user's own hook survives, ours are gone
    finally:
        model.reset_hooks()


def test_bad_factory_arguments(model):
    with pytest.raises(ValueError, match="layer 3 out of range.*valid 0..2"):
        hooks.skip(model, 3)
    with pytest.raises(ValueError, match="part must be one of"):
        hooks.skip(model, 0, part="ffn")
    with pytest.raises(ValueError, match="how must be"):
        hooks.ablate("blocks.0.hook_resid_pre", how="noise")
    with pytest.raises(ValueError, match="needs one exact hook name"):
        hooks.patch("blocks.*.hook_resid_pre", torch.zeros(1))
    with pytest.raises(ValueError, match="no hook names"):
        hooks.cache([])


@pytest.mark.needs_tl3(
    "it lists HookedTransformer's hook points; the bridge has more (attn.hook_in, attn.q.hook_out, ...)"
)
def test_hook_names_resolves_globs(model):
    assert hooks.hook_names(model, "blocks.*.hook_resid_pre") == [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert hooks.hook_names(model, ["hook_embed", "blocks.0.attn.hook_*"])[:2] == ["hook_embed", "blocks.0.attn.hook_k"]
