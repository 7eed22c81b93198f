"""The reproductions on a real pretrained model, SmolLM2-135M-Instruct (conftest's `smollm2`).

ioi runs on a small set of the IOI paper's prompts (8: `N_FRAMES` frames, ABBA and BABA; the CLI's
default is 120). Each number is checked against an independent computation: logit differences from
plain forward passes one prompt at a time, attention read from run_with_cache, path patching to the
logits computed by hand from the cached head outputs (final residual with one head's output swapped,
then the final norm and the unembedding), path patching into the name movers' queries against
`lenskit.path_patch` one prompt at a time; the classes against their stated rules; the JSON that
`lenskit reproduce --json` writes against the Reproduction. bos and tokenization against forward
passes and the tokenizer.
"""

import json

import pytest
import torch

import lenskit
from lenskit import cli, experiments, metrics
from lenskit.experiments import bos, ioi

N_FRAMES = 4


@pytest.fixture(scope="module")
def ioi_result(smollm2):
    return experiments.run("ioi", smollm2, progress=False, n_frames=N_FRAMES)


@pytest.fixture(scope="module")
def prompts(smollm2):
    """[(clean tokens [1, pos], corrupted tokens [1, pos], IO id, S id)] of the reproduction's prompts."""
    source, clean, corrupted = ioi.choose_prompts(smollm2, N_FRAMES)
    assert source == ioi.PAPER_SOURCE
    return [
        (
            smollm2.to_tokens(e.prompt),
            smollm2.to_tokens(c),
            smollm2.to_single_token(" " + e.io),
            smollm2.to_single_token(" " + e.subject),
        )
        for e, c in zip(clean, corrupted)
    ]


@pytest.fixture(scope="module")
def by_hand(smollm2, prompts):
    """Per prompt: clean and corrupted logit differences, the clean and corrupted caches (head z, the last
    residual stream, patterns)."""
    rows = []
    with torch.no_grad():
        for clean, corrupted, io, s in prompts:
            clean_logits, clean_cache = smollm2.run_with_cache(clean)
            corrupted_logits, corrupted_cache = smollm2.run_with_cache(corrupted)
            rows.append(
                dict(
                    clean=(clean_logits[0, -1, io] - clean_logits[0, -1, s]).item(),
                    corrupted=(corrupted_logits[0, -1, io] - corrupted_logits[0, -1, s]).item(),
                    clean_cache=clean_cache,
                    corrupted_cache=corrupted_cache,
                    io=io,
                    s=s,
                    tokens=clean,
                )
            )
    return rows


def value(result, measurement):
    (number,) = result.table.loc[result.table["measurement"] == measurement, "value"].tolist()
    return number


def circuit(result):
    return result.tables["circuit"].set_index("head")


def test_the_paper_set_uses_single_token_names_in_all_fifteen_templates(smollm2):
    names = ioi.single_token_names(smollm2)
    assert len(names) >= ioi.MIN_PAPER_NAMES
    for name in names:
        assert len(smollm2.to_str_tokens(" " + name, prepend_bos=False)) == 1
    assert "Brandon" not in names  # two tokens in SmolLM2's vocabulary
    source, clean, corrupted = ioi.choose_prompts(smollm2)
    assert source == ioi.PAPER_SOURCE and len(clean) == 2 * ioi.PAPER_FRAMES >= 100
    assert len({e.prompt.split(",")[0][:12] for e in clean}) > 5
    abba = [e for e in clean if e.prompt.index(e.io) < e.prompt.index(e.subject)]
    assert len(abba) == len(clean) // 2  # ABBA and BABA in equal numbers
    assert all(
        c != e.prompt and len(smollm2.to_tokens(c)[0]) == len(smollm2.to_tokens(e.prompt)[0])
        for e, c in zip(clean, corrupted)
    )


def test_logit_difference_and_accuracy_equal_plain_forward_passes(ioi_result, by_hand):
    clean = torch.tensor([row["clean"] for row in by_hand])
    corrupted = torch.tensor([row["corrupted"] for row in by_hand])
    assert value(ioi_result, "logit difference, clean") == pytest.approx(clean.mean().item(), abs=1e-3)
    assert value(ioi_result, "logit difference, corrupted") == pytest.approx(corrupted.mean().item(), abs=1e-3)
    assert value(ioi_result, "accuracy, clean") == (clean > 0).float().mean().item()
    assert value(ioi_result, "logit difference, clean") > 2  # SmolLM2 does IOI


def path_to_logits_by_hand(model, by_hand, layer, head):
    """Normalised: the mean over prompts of logit(IO) - logit(S) read from the corrupted final residual
    with head (layer, head)'s output swapped for its clean value."""
    clean_mean = sum(row["clean"] for row in by_hand) / len(by_hand)
    corrupted_mean = sum(row["corrupted"] for row in by_hand) / len(by_hand)
    total = 0.0
    W_O = model.blocks[layer].attn.W_O[head]
    name, last = f"blocks.{layer}.attn.hook_z", f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for row in by_hand:
        swap = (row["clean_cache"][name][0, :, head] - row["corrupted_cache"][name][0, :, head]) @ W_O
        final = row["corrupted_cache"][last][0] + swap
        logits = model.unembed(model.ln_final(final[None]))[0, -1]
        total += (logits[row["io"]] - logits[row["s"]]).item()
    return (total / len(by_hand) - corrupted_mean) / (clean_mean - corrupted_mean)


@torch.no_grad()
def test_path_patching_to_the_logits_equals_the_swap_by_hand(smollm2, ioi_result, by_hand):
    table = circuit(ioi_result)
    heads = [tuple(h) for h in ioi_result.numbers["name_movers"] + ioi_result.numbers["negative_name_movers"]]
    top = table.loc[table["class"] == "unclassed candidate"].index[:2]
    for layer, head in heads + [tuple(map(int, h.split("."))) for h in top]:
        expected = path_to_logits_by_hand(smollm2, by_hand, layer, head)
        assert table.loc[f"{layer}.{head}", "path to logits"] == pytest.approx(expected, abs=2e-3), (layer, head)


@torch.no_grad()
def test_path_patching_to_the_name_movers_queries_equals_path_patch_per_prompt(smollm2, ioi_result, prompts):
    name_movers = [tuple(h) for h in ioi_result.numbers["name_movers"]]
    s_inhibition = [tuple(h) for h in ioi_result.numbers["s_inhibition"]]
    assert name_movers and s_inhibition
    table = circuit(ioi_result)
    top = table.loc[table["class"] == "unclassed candidate", "path to name movers' q"].dropna().index[:1]
    senders = s_inhibition + [tuple(map(int, h.split("."))) for h in top]
    receivers = [(layer, head, "q") for layer, head in name_movers]
    patched, clean, corrupted = 0, 0, 0
    for clean_tokens, corrupted_tokens, io, s in prompts:
        one = lenskit.path_patch(
            smollm2,
            clean_tokens,
            corrupted_tokens,
            metrics.logit_diff(io, s),
            senders=senders,
            receivers=receivers,
            progress=False,
        )
        patched, clean, corrupted = patched + one.tensor, clean + one.clean_value, corrupted + one.corrupted_value
    expected = (patched - corrupted) / (clean - corrupted)
    for (layer, head), number in zip(senders, expected.tolist()):
        assert table.loc[f"{layer}.{head}", "path to name movers' q"] == pytest.approx(number, abs=2e-3), (layer, head)


@torch.no_grad()
def test_attention_and_attribution_of_the_circuit_heads_from_the_cache(smollm2, ioi_result, prompts, by_hand):
    table = circuit(ioi_result)
    for head_name in table.index:
        layer, head = map(int, head_name.split("."))
        io_at, s1_at, s2_at, attribution = [], [], [], []
        for (clean, _, io, s), row in zip(prompts, by_hand):
            ids = clean[0].tolist()
            first = ids.index(s)
            pattern = row["clean_cache"][f"blocks.{layer}.attn.hook_pattern"][0, head, -1]
            io_at.append(pattern[ids.index(io)].item())
            s1_at.append(pattern[first].item())
            s2_at.append(pattern[ids.index(s, first + 1)].item())
            cache = row["clean_cache"]
            out = cache[f"blocks.{layer}.attn.hook_z"][0, -1, head] @ smollm2.blocks[layer].attn.W_O[head]
            rms = cache["ln_final.hook_scale"][0, -1]
            direction = smollm2.W_U[:, io] - smollm2.W_U[:, s]
            attribution.append((out / rms @ direction).item())
        for column, numbers in (
            ("attn END->IO", io_at),
            ("attn END->S1", s1_at),
            ("attn END->S2", s2_at),
            ("direct attribution", attribution),
        ):
            assert table.loc[head_name, column] == pytest.approx(sum(numbers) / len(numbers), abs=2e-3), (
                head_name,
                column,
            )


def test_the_classes_follow_their_stated_rules(ioi_result):
    table = circuit(ioi_result)
    numbers = ioi_result.numbers
    for layer, head in numbers["name_movers"]:
        row = table.loc[f"{layer}.{head}"]
        assert row["class"] == "name mover" and row["path to logits"] >= ioi.NAME_MOVER_MIN
        assert row["direct attribution"] > 0 and row["attn END->IO"] > row["attn END->S1"] + row["attn END->S2"]
    for layer, head in numbers["s_inhibition"]:
        row = table.loc[f"{layer}.{head}"]
        assert row["class"] == "S-inhibition" and row["path to name movers' q"] >= ioi.S_INHIBITION_MIN
        assert row["attn END->S2"] > row["attn END->IO"]
        assert layer < min(nm[0] for nm in numbers["name_movers"])
    for key, column in (("name_movers", "path to logits"), ("s_inhibition", "path to name movers' q")):
        strengths = [table.loc[f"{layer}.{head}", column] for layer, head in numbers[key]]
        assert strengths == sorted(strengths, reverse=True)  # strongest first
    # an unclassed head that passes every rule of a class would be a bug
    for head_name, row in table[table["class"] == "unclassed candidate"].iterrows():
        assert not (
            row["path to logits"] >= ioi.NAME_MOVER_MIN
            and row["direct attribution"] > 0
            and row["attn END->IO"] > row["attn END->S1"] + row["attn END->S2"]
        ), head_name
    strong = table[(table["class"] == "unclassed candidate") & (table["path to logits"].abs() >= ioi.NAME_MOVER_MIN)]
    for head_name, row in strong.iterrows():  # the findings name them, with their numbers
        assert f"{head_name} (path to logits {row['path to logits']:+.2f}" in ioi_result.notes
    assert "Rules. Name mover" in ioi_result.notes and "Compared with GPT-2 small" in ioi_result.notes
    assert "9.9, 9.6, 10.0" in ioi_result.notes and "7.3, 7.9, 8.6, 8.10" in ioi_result.notes


def test_reproduce_json_holds_the_reproductions_numbers(ioi_result, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "run", lambda name, model, **options: ioi_result)
    out = tmp_path / "ioi.json"
    assert cli.main(["reproduce", "ioi", "--model", "smollm2-135m", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["name_movers"] == ioi_result.numbers["name_movers"]
    assert data["s_inhibition"] == ioi_result.numbers["s_inhibition"]
    assert all(isinstance(h, list) and len(h) == 2 for h in data["name_movers"] + data["s_inhibition"])
    rows = {(r["measurement"], r["component"]): r["value"] for r in data["rows"]}
    assert rows[("accuracy, clean", "logit IO > logit S")] == value(ioi_result, "accuracy, clean")
    assert [r["head"] for r in data["tables"]["circuit"]] == circuit(ioi_result).index.tolist()
    assert data["notes"] == ioi_result.notes


@torch.no_grad()
def test_bos_prepends_im_start_explicitly(smollm2):
    result = experiments.run("bos", smollm2, progress=False, n_frames=N_FRAMES)
    assert result.numbers == {"bos_token": "<|im_start|>", "bos_token_id": 1, "default_prepend_bos": False}
    demo = result.table.iloc[0]
    assert demo["prompt"] == bos.DEMO[0]
    tokens = smollm2.to_tokens(demo["prompt"])  # SmolLM2 adds no BOS by default
    assert tokens[0, 0].item() != 1
    for column, ids in (("without BOS", tokens), ("with BOS", torch.cat([torch.tensor([[1]]), tokens], 1))):
        logits = smollm2(ids)[0, -1]
        expected = (logits[smollm2.to_single_token(" Claire")] - logits[smollm2.to_single_token(" Mary")]).item()
        assert demo[column] == pytest.approx(expected, abs=1e-3), column
    _, clean, _ = ioi.choose_prompts(smollm2, N_FRAMES)
    ioi_row = result.table.iloc[1]
    assert ioi_row["prompt"].startswith(f"mean over {len(clean)} IOI prompts")
    for column, prefix in (("without BOS", []), ("with BOS", [1])):
        diffs = []
        for e in clean:
            logits = smollm2(torch.tensor([prefix + smollm2.to_tokens(e.prompt)[0].tolist()]))[0, -1]
            diffs.append(
                (logits[smollm2.to_single_token(" " + e.io)] - logits[smollm2.to_single_token(" " + e.subject)]).item()
            )
        assert ioi_row[column] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3), column
    assert "'<|im_start|>' (id 1)" in result.notes and "does not prepend it" in result.notes


def test_tokenization_with_smollm2s_tokenizer_through_the_cli(smollm2, session_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LENSKIT_CACHE", str(session_cache))
    out = tmp_path / "tokenization.json"
    assert cli.main(["reproduce", "tokenization", "--model", "smollm2-135m", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["tokens"][" Claire"] == [" Claire"] == smollm2.to_str_tokens(" Claire", prepend_bos=False)
    assert data["tokens"]["Claire"] == ["Cl", "aire"] == smollm2.to_str_tokens("Claire", prepend_bos=False)
    assert "smollm2-135m's tokenizer" in data["title"]
    assert "smollm2-135m's tokenizer" in capsys.readouterr().out
