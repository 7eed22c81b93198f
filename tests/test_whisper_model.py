"""HookedWhisper against openai-whisper and Hugging Face on random weights; hook names and hook semantics."""

import pytest
import torch
from test_whisper_support import SMALL, hf_whisper, one_torch_thread, openai_whisper  # noqa: F401  (fixture)

from lenskit import hooks
from lenskit.whisper import HookedWhisper, WhisperConfig, convert, from_hf, from_openai, load

pytestmark = pytest.mark.both_backends  # HookedWhisper is lenskit's own HookedRootModule: the same on 4.x

TINY = WhisperConfig.tiny()
TOL = 1e-4


def inputs(cfg: WhisperConfig, batch: int = 2, n_tokens: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, cfg.n_mels, cfg.n_frames, generator=generator)
    return mel, torch.randint(0, cfg.n_vocab, (batch, n_tokens), generator=generator)


@pytest.fixture(scope="module")
def small_pair():
    reference = openai_whisper(SMALL, seed=3)
    return reference, from_openai(reference)


@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
@torch.no_grad()
def test_equals_openai_whisper(cfg):
    from whisper.model import disable_sdpa

    reference = openai_whisper(cfg, seed=1)
    model = from_openai(reference)
    mel, tokens = inputs(cfg, batch=1 if cfg is TINY else 2)
    with disable_sdpa():
        expected_audio = reference.encoder(mel)
        expected_logits = reference.decoder(tokens, expected_audio)
    audio = model.encode(mel)
    torch.testing.assert_close(audio, expected_audio, atol=TOL, rtol=0)
    torch.testing.assert_close(model.decode(tokens, audio), expected_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
@torch.no_grad()
def test_equals_hugging_face_eager(cfg):
    reference = hf_whisper(cfg, seed=2)
    assert reference.config._attn_implementation == "eager"
    model = from_hf(reference)
    mel, tokens = inputs(cfg, batch=1 if cfg is TINY else 2)
    out = reference(input_features=mel, decoder_input_ids=tokens)
    torch.testing.assert_close(model.encode(mel), out.encoder_last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(model(mel, tokens), out.logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_attention_patterns_equal_openai_whisper(small_pair):
    """hook_pattern is softmax(q k / sqrt(d_head)) per head: compare with openai-whisper's own weights."""
    from whisper.model import disable_sdpa

    reference, model = small_pair
    mel, tokens = inputs(SMALL)
    seen = {}
    handles = [
        reference.decoder.blocks[1].attn.register_forward_hook(lambda m, i, o: seen.update(self=o[1])),
        reference.decoder.blocks[1].cross_attn.register_forward_hook(lambda m, i, o: seen.update(cross=o[1])),
        reference.encoder.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.update(encoder=o[1])),
    ]
    try:
        with disable_sdpa():
            reference(mel, tokens)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = model.run_with_cache(mel, tokens)
    for name, key in [
        ("decoder.blocks.1.attn", "self"),
        ("decoder.blocks.1.cross_attn", "cross"),
        ("encoder.blocks.0.attn", "encoder"),
    ]:
        torch.testing.assert_close(cache[f"{name}.hook_pattern"], seen[key].softmax(-1), atol=1e-5, rtol=0)
    assert (cache["decoder.blocks.1.attn.hook_pattern"][0, :, 2, 3:] == 0).all()  # causal


def test_hook_names_follow_transformer_lens():
    model = HookedWhisper(SMALL)
    names = set(model.hook_dict)
    expected = {
        "encoder.hook_conv1",
        "encoder.hook_conv2",
        "encoder.hook_pos_embed",
        "encoder.ln_post.hook_scale",
        "encoder.ln_post.hook_normalized",
        "decoder.hook_embed",
        "decoder.hook_pos_embed",
        "decoder.ln_final.hook_scale",
        "decoder.ln_final.hook_normalized",
    }
    for layer in range(SMALL.n_audio_layer):
        block = f"encoder.blocks.{layer}"
        expected |= {f"{block}.hook_{n}" for n in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")}
        expected |= {f"{block}.attn.hook_{n}" for n in ("q", "k", "v", "attn_scores", "pattern", "z")}
        expected |= {f"{block}.mlp.hook_pre", f"{block}.mlp.hook_post"}
        expected |= {f"{block}.{ln}.hook_{n}" for ln in ("ln1", "ln2") for n in ("scale", "normalized")}
    for layer in range(SMALL.n_text_layer):
        block = f"decoder.blocks.{layer}"
        expected |= {
            f"{block}.hook_{n}"
            for n in (
                "resid_pre",
                "resid_mid",
                "resid_mid_cross",
                "resid_post",
                "attn_out",
                "cross_attn_out",
                "mlp_out",
            )
        }
        expected |= {
            f"{block}.{a}.hook_{n}"
            for a in ("attn", "cross_attn")
            for n in ("q", "k", "v", "attn_scores", "pattern", "z")
        }
        expected |= {f"{block}.mlp.hook_pre", f"{block}.mlp.hook_post"}
        expected |= {f"{block}.{ln}.hook_{n}" for ln in ("ln1", "ln2", "ln3") for n in ("scale", "normalized")}
    assert names == expected
    assert hooks.count_layers(model, "encoder.blocks") == SMALL.n_audio_layer
    assert hooks.count_layers(model, "decoder.blocks") == SMALL.n_text_layer


@torch.no_grad()
def test_run_with_cache_shapes_every_position(small_pair):
    _, model = small_pair
    mel, tokens = inputs(SMALL, batch=2, n_tokens=5)
    logits, cache = model.run_with_cache(mel, tokens)
    b, p, a, h, dh = 2, 5, SMALL.n_audio_ctx, SMALL.n_text_head, SMALL.n_text_state // SMALL.n_text_head
    assert logits.shape == (b, p, SMALL.n_vocab)
    assert cache["encoder.hook_conv1"].shape == (b, SMALL.n_frames, SMALL.n_audio_state)
    assert cache["encoder.blocks.1.attn.hook_pattern"].shape == (b, h, a, a)
    assert cache["decoder.blocks.2.attn.hook_z"].shape == (b, p, h, dh)
    assert cache["decoder.blocks.2.cross_attn.hook_k"].shape == (b, a, h, dh)
    assert cache["decoder.blocks.2.cross_attn.hook_pattern"].shape == (b, h, p, a)
    assert cache["decoder.ln_final.hook_scale"].shape == (b, p, 1)
    # the residual stream is the sum of what the components wrote
    resid = cache["decoder.hook_embed"] + cache["decoder.hook_pos_embed"]
    for layer in range(SMALL.n_text_layer):
        resid = resid + sum(
            cache[f"decoder.blocks.{layer}.hook_{n}"] for n in ("attn_out", "cross_attn_out", "mlp_out")
        )
    torch.testing.assert_close(
        resid, cache[f"decoder.blocks.{SMALL.n_text_layer - 1}.hook_resid_post"], atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_layer_norm_scale_hook_reads_and_edits_the_scale(small_pair):
    """hook_scale is sqrt(var + eps) per position; editing it rescales the normalised output."""
    _, model = small_pair
    mel, tokens = inputs(SMALL)
    plain = model(mel, tokens)
    logits, cache = model.run_with_cache(mel, tokens)  # every hook listening: the unfused path
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    resid = cache[f"decoder.blocks.{SMALL.n_text_layer - 1}.hook_resid_post"]
    expected_scale = (resid.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(cache["decoder.ln_final.hook_scale"], expected_scale, atol=1e-6, rtol=1e-5)
    doubled = model.run_with_hooks(mel, tokens, fwd_hooks=[("decoder.ln_final.hook_scale", lambda x, hook: 2 * x)])
    ln = model.decoder.ln_final
    by_hand = (cache["decoder.ln_final.hook_normalized"] / 2 * ln.w + ln.b) @ model.W_U
    torch.testing.assert_close(doubled, by_hand, atol=1e-5, rtol=0)


@torch.no_grad()
def test_ablating_a_cross_attention_head_removes_exactly_its_output(small_pair):
    _, model = small_pair
    mel, tokens = inputs(SMALL)
    layer, head = 1, 2
    name = f"decoder.blocks.{layer}.hook_resid_mid_cross"
    clean = hooks.cache([name, f"decoder.blocks.{layer}.cross_attn.hook_z"])
    clean.run(model, mel, tokens)
    ablated = hooks.ablate(f"decoder.blocks.{layer}.cross_attn.hook_z", head=head) + hooks.cache(name)
    ablated.run(model, mel, tokens)
    head_output = (
        clean.store[f"decoder.blocks.{layer}.cross_attn.hook_z"][:, :, head]
        @ model.decoder.blocks[layer].cross_attn.W_O[head]
    )
    torch.testing.assert_close(clean.store[name] - ablated.store[name], head_output, atol=1e-5, rtol=0)


@torch.no_grad()
def test_skip_makes_encoder_blocks_the_identity(small_pair):
    _, model = small_pair
    mel, _ = inputs(SMALL)
    h = hooks.skip(model, [1], stack="encoder.blocks") + hooks.cache("encoder.blocks.*.hook_resid_*")
    with h.on(model):
        audio = model.encode(mel)
    assert torch.equal(h.store["encoder.blocks.1.hook_resid_post"], h.store["encoder.blocks.1.hook_resid_pre"])
    torch.testing.assert_close(
        audio, model.encoder.ln_post(h.store["encoder.blocks.0.hook_resid_post"]), atol=0, rtol=0
    )


def test_unknown_hook_names_and_bad_inputs_raise():
    model = HookedWhisper(SMALL)
    mel, tokens = inputs(SMALL)
    with pytest.raises(ValueError, match="unknown hook name.*did you mean"):
        hooks.cache("decoder.blocks.0.crossattn.hook_z").run(model, mel, tokens)
    with pytest.raises(ValueError, match=r"head 9 out of range"):
        hooks.ablate("decoder.blocks.0.cross_attn.hook_z", head=9).run(model, mel, tokens)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    with pytest.raises(ValueError, match=r"shape \[batch, 128, 48\]"):
        model(mel[:, :, :10], tokens)
    with pytest.raises(ValueError, match="token ids must lie in 0..299"):
        model(mel, tokens + SMALL.n_vocab)
    with pytest.raises(ValueError, match="exceed the decoder's context of 20"):
        model(mel, torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="n_audio_state .* must equal n_text_state"):
        WhisperConfig(**(SMALL.to_dict() | {"n_text_state": 32}))


@torch.no_grad()
def test_load_from_hf_folder_and_openai_checkpoint(tmp_path, small_pair):
    reference, model = small_pair
    mel, tokens = inputs(SMALL)
    expected = model(mel, tokens)
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": reference.state_dict()}, tmp_path / "small.pt")
    torch.testing.assert_close(load(tmp_path / "small.pt")(mel, tokens), expected, atol=0, rtol=0)

    hf = hf_whisper(SMALL, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(load(tmp_path / "hf")(mel, tokens), from_hf(hf)(mel, tokens), atol=0, rtol=0)

    broken = dict(reference.state_dict())
    broken.pop("decoder.blocks.1.cross_attn.query.weight")
    with pytest.raises(ValueError, match="no parameter 'decoder.blocks.1.cross_attn.query.weight'"):
        from_openai({"dims": SMALL.to_dict(), "model_state_dict": broken})
    with pytest.raises(ValueError, match="'dims' and 'model_state_dict'"):
        from_openai({"weights": {}})


def test_load_dispatches_names_to_their_download_paths(monkeypatch, small_pair):
    """Offline: openai names go to openai-whisper's downloader, other names to the Hugging Face hub."""
    reference, _ = small_pair
    hf = hf_whisper(SMALL, seed=5)
    calls = []
    monkeypatch.setattr(convert, "_openai_load_model", lambda name, root: calls.append(("openai", name)) or reference)
    monkeypatch.setattr(convert, "_hf_from_pretrained", lambda name: calls.append(("hf", name)) or hf)
    assert isinstance(load("tiny"), HookedWhisper) and isinstance(load("base.en"), HookedWhisper)
    assert isinstance(load("openai/whisper-tiny"), HookedWhisper)
    assert calls == [("openai", "tiny"), ("openai", "base.en"), ("hf", "openai/whisper-tiny")]


def test_unembedding_copy_follows_every_change_of_the_embedding():
    """Without autograd the decoder unembeds through a cached contiguous W_E.T: in-place edits, new data and
    inference mode all give the logits of the differentiable path."""
    model = HookedWhisper(SMALL).eval()
    mel, tokens = inputs(SMALL, batch=1)

    def both():
        with torch.no_grad():
            cached = model(mel, tokens)
        return cached, model(mel, tokens)  # grad enabled: F.linear against W_E itself

    before, reference = both()
    torch.testing.assert_close(before, reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        model.decoder.W_E[tokens[0, 0]] += torch.randn(SMALL.n_text_state, generator=torch.Generator().manual_seed(0))
    after, reference = both()
    assert (after - before).abs().max() > 0.01
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=0)
    model.decoder.W_E.data = torch.randn_like(model.decoder.W_E)
    with torch.inference_mode():
        fresh = model(mel, tokens)
    torch.testing.assert_close(fresh, model(mel, tokens), atol=1e-5, rtol=0)
