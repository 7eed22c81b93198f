"""Layer surgery, checked against TransformerLens' own forward pass, caches and hand-called blocks."""

import pytest
import torch
import transformers
from conftest import STORIES_DIR, WORDS, blocks_by_hand, make_model, word_tokenizer

import lenskit
from lenskit import hooks, surgery

KINDS = ["gpt2", "llama", "neox"]
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return make_model(request.param)


def no_hooks_left(model):
    return all(not point.fwd_hooks for point in model.hook_dict.values())


@torch.no_grad()
def test_keeping_the_first_k_blocks_is_the_logit_lens(model, tokens):
    _, cache = model.run_with_cache(tokens)
    n_layers = model.cfg.n_layers
    for k in range(1, n_layers):
        lens = model.unembed(model.ln_final(cache[f"blocks.{k}.hook_resid_pre"]))
        torch.testing.assert_close(surgery.run(model, tokens, surgery.skip_last(model, n_layers - k)), lens, **TOL)
        torch.testing.assert_close(surgery.run_blocks(model, tokens, range(k)), lens, **TOL)
    assert no_hooks_left(model)


@torch.no_grad()
def test_the_identity_sequence_is_the_plain_model(model, tokens):
    plain = model(tokens)
    torch.testing.assert_close(surgery.run(model, tokens, surgery.full(model)), plain, rtol=0, atol=0)
    torch.testing.assert_close(surgery.run_blocks(model, tokens, surgery.full(model)), plain, **TOL)
    mask = torch.ones_like(tokens)
    mask[:, :3] = 0  # left padding
    torch.testing.assert_close(
        surgery.run_blocks(model, tokens, surgery.full(model), attention_mask=mask),
        model(tokens, attention_mask=mask),
        **TOL,
    )


@torch.no_grad()
def test_shortformer_positions_reach_every_scheduled_block(tokens):
    """Shortformer models add the positional embedding to each block's queries and keys, not to the stream."""
    model = make_model("gpt2", positional_embedding_type="shortformer")
    torch.testing.assert_close(surgery.run_blocks(model, tokens, surgery.full(model)), model(tokens), **TOL)
    positions = model.pos_embed(tokens)
    x = model.embed(tokens)
    for block in [2, 0, 0]:
        x = model.blocks[block](x, shortformer_pos_embed=positions)
    torch.testing.assert_close(surgery.run(model, tokens, [2, 0, 0]), model.unembed(model.ln_final(x)), **TOL)


@torch.no_grad()
def test_a_repeated_block_equals_calling_it_twice_by_hand(model, tokens):
    _, cache = model.run_with_cache(tokens)
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        x = model.blocks[layer](cache[f"blocks.{layer}.hook_resid_post"])  # the second call
        for block in range(layer + 1, n_layers):
            x = model.blocks[block](x)
        expected = model.unembed(model.ln_final(x))
        torch.testing.assert_close(surgery.run(model, tokens, surgery.repeat(model, layer)), expected, **TOL)


@torch.no_grad()
def test_any_sequence_equals_its_blocks_called_by_hand(tokens):
    for kind in KINDS:
        model = make_model(kind, n_layers=6)
        blocks = [0, 1, 2, 2, 3, 5, 4]
        torch.testing.assert_close(
            surgery.run(model, tokens, surgery.sequence(blocks)), blocks_by_hand(model, tokens, blocks), **TOL
        )
        torch.testing.assert_close(surgery.run(model, tokens, [5, 0]), blocks_by_hand(model, tokens, [5, 0]), **TOL)


@torch.no_grad()
def test_skipping_by_hooks_equals_the_runner_without_those_blocks(model, tokens):
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        rest = [block for block in range(n_layers) if block != layer]
        torch.testing.assert_close(
            hooks.skip(model, [layer]).run(model, tokens), surgery.run_blocks(model, tokens, rest), **TOL
        )
        torch.testing.assert_close(surgery.run(model, tokens, rest), blocks_by_hand(model, tokens, rest), **TOL)
    middle = surgery.skip_range(model, 1, n_layers - 1 if n_layers > 2 else 2)
    torch.testing.assert_close(surgery.run(model, tokens, middle), blocks_by_hand(model, tokens, middle.blocks), **TOL)


@torch.no_grad()
def test_a_skipped_block_is_exactly_the_identity(model, tokens):
    layer = model.cfg.n_layers - 1
    stored = hooks.cache([f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"])
    with (surgery.skip_last(model, 1).hooks(model) + stored).on(model):
        model(tokens)
    assert torch.equal(stored.store[f"blocks.{layer}.hook_resid_pre"], stored.store[f"blocks.{layer}.hook_resid_post"])


@torch.no_grad()
def test_padding_leaves_the_real_positions_unchanged(model, tokens):
    """A left-padded (with its mask) or right-padded row gives, at its real tokens, the unpadded row's logits."""
    row, pads = tokens[:1, :7], torch.zeros(1, 3, dtype=torch.long)
    for schedule in [surgery.repeat(model, 1), surgery.sequence([1, 0]), surgery.skip_first(model, 1)]:
        unpadded = surgery.run(model, row, schedule)
        left = surgery.run(
            model,
            torch.cat([pads, row], dim=1),
            schedule,
            attention_mask=torch.cat([torch.zeros_like(pads), torch.ones_like(row)], dim=1),
        )
        right = surgery.run(model, torch.cat([row, pads], dim=1), schedule)
        torch.testing.assert_close(left[:, 3:], unpadded, **TOL)
        torch.testing.assert_close(right[:, :7], unpadded, **TOL)


@torch.no_grad()
def test_hooks_inside_blocks_fire_under_a_schedule(model, tokens):
    calls = {}

    def count(activation, hook):
        calls[hook.name] = calls.get(hook.name, 0) + 1

    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_resid_pre"), count)]):
        surgery.run(model, tokens, [1, 0, 1, 1])
    assert calls == {"blocks.0.hook_resid_pre": 1, "blocks.1.hook_resid_pre": 3}

    calls.clear()
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_resid_pre"), count)]):
        surgery.run(model, tokens, surgery.skip_first(model, 1))  # in order: left-out blocks still run
    assert calls == {f"blocks.{layer}.hook_resid_pre": 1 for layer in range(model.cfg.n_layers)}

    # lenskit hooks apply too: a cache keeps a repeated block's second input, its first output
    _, cache = model.run_with_cache(tokens)
    stored = hooks.cache("blocks.0.hook_resid_pre")
    with stored.on(model):
        surgery.run(model, tokens, surgery.repeat(model, 0))
    torch.testing.assert_close(stored.store["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"], **TOL)

    # and a hook that changes an activation changes the scheduled run as it changes the plain one
    ablated = hooks.ablate("blocks.0.attn.hook_z", head=1)
    expected = ablated.run(model, tokens)
    assert not torch.allclose(expected, model(tokens))
    with ablated.on(model):
        torch.testing.assert_close(surgery.run_blocks(model, tokens, surgery.full(model)), expected, **TOL)
    assert no_hooks_left(model)


def test_schedule_hooks_are_removed_when_the_forward_pass_raises(model, tokens):
    def fail(activation, hook):
        raise RuntimeError("boom")

    model.add_hook("blocks.0.hook_resid_post", fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            surgery.run(model, tokens, surgery.skip_last(model, 1))
        attached = {name: len(point.fwd_hooks) for name, point in model.hook_dict.items() if point.fwd_hooks}
        assert attached == {"blocks.0.hook_resid_post": 1}
    finally:
        model.reset_hooks()


@torch.no_grad()
def test_greedy_generation_equals_an_argmax_loop(model, tokens):
    prompt = tokens[:2, :5]
    n_layers = model.cfg.n_layers
    tl = dict(max_new_tokens=6, do_sample=False, use_past_kv_cache=False, stop_at_eos=False, verbose=False)
    full = surgery.generate(model, prompt, surgery.full(model), 6)
    assert torch.equal(full, model.generate(prompt, **tl))
    with hooks.skip(model, [0]).on(model):
        expected = model.generate(prompt, **tl)
    assert torch.equal(surgery.generate(model, prompt, surgery.skip_first(model, 1), 6), expected)

    blocks = [n_layers - 1, *range(n_layers), 0]
    expected = prompt
    for _ in range(6):
        expected = torch.cat([expected, blocks_by_hand(model, expected, blocks)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(surgery.generate(model, prompt, blocks, 6), expected)


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """A gpt2-shaped model whose vocabulary is the word tokenizer's."""
    model = make_model("gpt2", d_vocab=len(WORDS))
    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


@torch.no_grad()
def test_evaluate_reports_loss_top_tokens_and_generation(worded):
    model = worded
    texts = ["the cat sat on a mat", "a dog ran on the mat and the cat sat"]
    schedules = [surgery.full(model), surgery.skip_range(model, 1, 2), surgery.sequence([2, 1, 0])]
    table = surgery.evaluate(model, schedules, texts, positions=[2, -1], generate_tokens=4, top_k=3, progress=False)
    assert list(table.columns) == ["schedule", "blocks", "loss", "top3@2", "top3@-1", "generation"]
    assert list(table.schedule) == ["full", "skip 1..1", "blocks [2, 1, 0]"]

    prompt = model.to_tokens(texts[0])
    for row, blocks, extra in zip(
        table.itertuples(), [(0, 1, 2), (0, 2), (2, 1, 0)], [hooks.Hooks(), hooks.skip(model, [1]), None]
    ):
        assert row.blocks == blocks
        if extra is None:  # a reordering: the reference is the blocks called by hand
            logits = [blocks_by_hand(model, model.to_tokens(text), blocks) for text in texts]
            generated = prompt
            for _ in range(4):
                step = blocks_by_hand(model, generated, blocks)[:, -1].argmax(-1, keepdim=True)
                generated = torch.cat([generated, step], dim=1)
        else:
            with extra.on(model):
                logits = [model(model.to_tokens(text)) for text in texts]
                generated = model.generate(
                    prompt, max_new_tokens=4, do_sample=False, use_past_kv_cache=False, stop_at_eos=False, verbose=False
                )
        per_token = torch.cat(
            [model.loss_fn(lg, model.to_tokens(text), per_token=True)[0] for lg, text in zip(logits, texts)]
        )
        assert row.loss == pytest.approx(per_token.mean().item(), abs=1e-5)
        assert table.loc[row.Index, "top3@2"] == model.to_str_tokens(logits[0][0, 2].topk(3).indices)
        assert table.loc[row.Index, "top3@-1"] == model.to_str_tokens(logits[0][0, -1].topk(3).indices)
        assert row.generation == model.to_string(generated[0, prompt.shape[1] :])


def test_errors_name_the_problem(worded, tokens):
    model = worded
    with pytest.raises(ValueError, match=r"block 3 out of range.*3 blocks \(valid 0\.\.2\)"):
        surgery.run(model, tokens[:, :5] % 13, [0, 3])
    with pytest.raises(ValueError, match=r"block 7 out of range.*valid 0\.\.2"):
        surgery.run(model, tokens[:, :5] % 13, [0, 1, 7])  # the in-order path checks too
    with pytest.raises(ValueError, match="block -1 out of range"):
        surgery.sequence([0, -1])
    with pytest.raises(ValueError, match="empty"):
        surgery.sequence([])
    with pytest.raises(ValueError, match="cannot leave out 3 blocks.*0\\.\\.2"):
        surgery.skip_last(model, 3)
    with pytest.raises(ValueError, match="start=2, stop=1"):
        surgery.skip_range(model, 2, 1)
    with pytest.raises(ValueError, match="repeat: block 5 out of range"):
        surgery.repeat(model, 5)
    with pytest.raises(ValueError, match="repeats or reorders"):
        surgery.repeat(model, 1).hooks(model)
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        surgery.generate(model, tokens[:, :10] % 13, surgery.full(model), 60)
    with pytest.raises(ValueError, match="texts is empty"):
        surgery.evaluate(model, [surgery.full(model)], [], progress=False)
    with pytest.raises(ValueError, match="position 9 out of range.*6 tokens"):
        surgery.evaluate(model, [surgery.full(model)], "the cat sat on a", positions=[9], progress=False)
    with pytest.raises(ValueError, match=r"block 4 out of range"):
        surgery.evaluate(model, [[4]], "the cat sat", progress=False)
    assert no_hooks_left(model)


requires_stories = pytest.mark.skipif(not (STORIES_DIR / "stories260K.bin").is_file(), reason=f"{STORIES_DIR} absent")


@pytest.fixture(scope="module")
def stories():
    return lenskit.load(STORIES_DIR)


@requires_stories
@torch.no_grad()
def test_stories260k_full_schedule_is_the_model_and_skipping_changes_the_story(stories):
    story = "Once upon a time, there was a little dog named Max. Max liked to play with his ball."
    tokens = stories.to_tokens(story)
    torch.testing.assert_close(surgery.run_blocks(stories, tokens, surgery.full(stories)), stories(tokens), **TOL)

    from_bos = surgery.generate(stories, stories.to_tokens(""), surgery.full(stories), 16)
    assert stories.to_string(from_bos[0, 1:]).strip().startswith("Once upon a time, there was a little girl named Lily")

    schedules = [surgery.full(stories), surgery.skip_last(stories, 2), surgery.repeat(stories, 2)]
    table = surgery.evaluate(stories, schedules, story, generate_tokens=12, progress=False)
    assert table.loss[0] == pytest.approx(stories(tokens, return_type="loss").item(), abs=1e-5)
    plain = stories.generate(
        tokens, max_new_tokens=12, do_sample=False, use_past_kv_cache=False, stop_at_eos=False, verbose=False
    )
    assert table.generation[0] == stories.to_string(plain[0, tokens.shape[1] :])
    assert table.loss[1] > table.loss[0] + 0.5  # a trained model needs its last blocks
    assert table.generation[1] != table.generation[0]
