"""Train the zoo's small Whisper on espeak-ng speech (`lenskit.zoo.speech_data`) and save it as a lenskit folder.

    python -m lenskit.zoo.train_speech speech-3l                         # writes lenskit/zoo/checkpoints/speech-3l/
    python -m lenskit.zoo.train_speech tiny --steps 5 --out /tmp/tiny    # a smoke run

The model is Whisper's architecture at reduced size, reading 3-second windows (n_audio_ctx 150),
with a vocabulary that is the subset of Whisper's multilingual tokens its words need (see
`lenskit.whisper.SubsetTokenizer`). Utterances (template sentences and random word sequences:
`lenskit.zoo.speech_data`) are synthesised once at the start, then every step draws a batch with
fresh noise, gain and delay and a masked band of mel bins (SpecAugment's frequency mask).

Curriculum: the first `template_steps` draw template sentences only, where the sentence frame tells
the model which kind of word comes where and it soon learns to hear them; then every batch draws
from all utterances, mostly random word sequences that no frame binds. (Trained on the mix from the
start, shortest utterances first, the model stayed at chance on the words for the 450 steps it was
given.)

Seeded; the folder gets the files of `lenskit.whisper.save` and train_log.csv (step, loss, lr,
seconds, held_out_loss: on held-out random word sequences in the held-out voice).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lenskit.errors import InputError
from lenskit.models import ZOO_ROOT
from lenskit.whisper.audio import log_mel_spectrogram, pad_or_trim
from lenskit.whisper.convert import save
from lenskit.whisper.model import HookedWhisper, WhisperConfig
from lenskit.whisper.tokenizer import SubsetTokenizer
from lenskit.zoo.speech_data import MAX_SECONDS, Utterance, augment, utterances, words
from lenskit.zoo.train import command_line, run_steps, with_overrides

LOG_FILE = "train_log.csv"
N_AUDIO_CTX = round(MAX_SECONDS * 50)  # 50 audio positions per second (10 ms mel hop, conv stride 2)


@dataclass
class SpeechRecipe:
    """Architecture, data and optimisation of one zoo speech model."""

    n_layers: int = 3  # in the encoder and in the decoder
    d_model: int = 128
    n_heads: int = 4
    n_text_ctx: int = 16
    n_utterances: int = 8000  # synthesised for training: n_sentences template sentences, the rest word sequences
    n_sentences: int = 2000
    steps: int = 3000
    template_steps: int = 500  # the first steps draw template sentences only
    freq_mask: int = 8  # each utterance gets a band of 0 to this many mel bins set to its mean
    batch_size: int = 32
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    log_every: int = 50
    seed: int = 0


RECIPES = {
    "speech-3l": SpeechRecipe(),
    "tiny": SpeechRecipe(
        n_layers=1,
        d_model=32,
        n_heads=2,
        n_utterances=8,
        n_sentences=4,
        steps=4,
        template_steps=2,
        batch_size=4,
        warmup_steps=2,
        log_every=2,
    ),
}


def build_tokenizer() -> SubsetTokenizer:
    """The multilingual tokenizer restricted to the start sequence, end of text and every word's token."""
    from whisper.tokenizer import get_tokenizer

    full = get_tokenizer(True, language="en", task="transcribe")
    ids = [*full.sot_sequence_including_notimestamps, full.eot]
    for word in words():
        ids += [i for i in full.encode(" " + word) if i not in ids]
    return SubsetTokenizer(full, sorted(ids))


def build_model(recipe: SpeechRecipe, tokenizer: SubsetTokenizer) -> HookedWhisper:
    """A freshly initialised HookedWhisper for `recipe` (seeded by recipe.seed)."""
    torch.manual_seed(recipe.seed)
    cfg = WhisperConfig(
        n_mels=80,
        n_audio_ctx=N_AUDIO_CTX,
        n_audio_state=recipe.d_model,
        n_audio_head=recipe.n_heads,
        n_audio_layer=recipe.n_layers,
        n_vocab=len(tokenizer.vocabulary),
        n_text_ctx=recipe.n_text_ctx,
        n_text_state=recipe.d_model,
        n_text_head=recipe.n_heads,
        n_text_layer=recipe.n_layers,
    )
    return HookedWhisper(cfg, tokenizer.vocabulary)


def mask_frequencies(mel: Tensor, max_bins: int, generator: torch.Generator) -> Tensor:
    """`mel` [n_mels, frames] with a band of 0 to `max_bins` consecutive mel bins set to its mean."""
    width = int(torch.randint(0, max_bins + 1, (1,), generator=generator))
    if width == 0:
        return mel
    start = int(torch.randint(0, mel.shape[0] - width + 1, (1,), generator=generator))
    mel = mel.clone()
    mel[start : start + width] = mel.mean()
    return mel


def batch(
    data: list[Utterance],
    tokenizer: SubsetTokenizer,
    n_frames: int,
    n_text_ctx: int,
    generator: torch.Generator | None,
    freq_mask: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-mel inputs [batch, 80, n_frames], decoder tokens [batch, n_text_ctx] (start sequence, text,
    end of text, padding) and a mask [batch, n_text_ctx] of the positions whose next token is scored.
    With a `generator`, each utterance gets fresh noise, gain and delay (`augment`) and a masked band of
    up to `freq_mask` mel bins (`mask_frequencies`)."""
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    mels, tokens, mask = [], torch.full((len(data), n_text_ctx), tokenizer.eot), torch.zeros(len(data), n_text_ctx)
    for row, utterance in enumerate(data):
        samples = augment(utterance.samples, generator) if generator is not None else utterance.samples
        mel = log_mel_spectrogram(pad_or_trim(samples, n_frames * 160))
        mels.append(mask_frequencies(mel, freq_mask, generator) if generator is not None and freq_mask else mel)
        ids = prompt + tokenizer.encode(" " + utterance.text) + [tokenizer.eot]
        if len(ids) > n_text_ctx:
            raise InputError(f"{utterance.text!r} needs {len(ids)} decoder positions; the model has {n_text_ctx}")
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, len(prompt) - 1 : len(ids) - 1] = 1  # predict the text and the end of text
    return torch.stack(mels), tokens, mask


def transcript_loss(model: HookedWhisper, mel: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy at the masked positions."""
    logits = model(mel, tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return (losses * mask[:, :-1].flatten()).sum() / mask[:, :-1].sum()


def curriculum(recipe: SpeechRecipe, step: int) -> str:
    """What batches draw from at `step`: "sentences" (template sentences only) first, then "all"."""
    return "sentences" if step < recipe.template_steps else "all"


def train(
    recipe: SpeechRecipe, out: str | Path, progress: bool = True, snapshot_every: int | None = None
) -> HookedWhisper:
    """Synthesise the data, train a model following `recipe`, save it and its loss log into `out`, return it.
    With `snapshot_every`, the model so far is also saved into `out`/snapshot every that many steps
    (training is unchanged)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(recipe, tokenizer)
    sentences = utterances(
        recipe.n_sentences,
        recipe.seed,
        held_out_sentences=False,
        held_out_voice=False,
        progress=progress,
        kind="sentences",
    )
    sequences = utterances(
        recipe.n_utterances - recipe.n_sentences,
        recipe.seed + 2,
        held_out_sentences=False,
        held_out_voice=False,
        progress=progress,
        kind="sequences",
    )
    held_out = batch(
        utterances(
            max(4, recipe.batch_size),
            recipe.seed + 1,
            held_out_sentences=True,
            held_out_voice=True,
            progress=False,
            kind="sequences",
        ),
        tokenizer,
        model.cfg.n_frames,
        recipe.n_text_ctx,
        generator=None,
    )
    pools = {"sentences": sentences, "all": sentences + sequences}
    rng, generator = random.Random(recipe.seed), torch.Generator().manual_seed(recipe.seed)
    step = 0

    def batch_loss() -> Tensor:
        nonlocal step
        pool = pools[curriculum(recipe, step)]
        mel, tokens, mask = batch(
            rng.sample(pool, recipe.batch_size),
            tokenizer,
            model.cfg.n_frames,
            recipe.n_text_ctx,
            generator,
            recipe.freq_mask,
        )
        step += 1
        return transcript_loss(model, mel, tokens, mask)

    def probe() -> float:
        if snapshot_every and step % snapshot_every == 0:
            save(model, out / "snapshot")
        return transcript_loss(model, *held_out).item()

    run_steps(model, recipe, batch_loss, "held_out_loss", probe, out / LOG_FILE, progress)
    save(model, out)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = command_line(__doc__.splitlines()[0], RECIPES)
    parser.add_argument("--utterances", type=int, help="utterances synthesised for training (default: the recipe's)")
    parser.add_argument(
        "--snapshot-every",
        type=int,
        help="also save the model so far into OUT/snapshot every "
        "this many steps (a multiple of the log interval; training is unchanged)",
    )
    args = parser.parse_args(argv)
    recipe = with_overrides(RECIPES[args.name], steps=args.steps, n_utterances=args.utterances, seed=args.seed)
    torch.set_num_threads(args.threads)
    train(recipe, args.out or ZOO_ROOT / args.name, snapshot_every=args.snapshot_every)


if __name__ == "__main__":
    main()
