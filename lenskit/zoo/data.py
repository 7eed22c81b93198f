"""The zoo's training and evaluation data: IOI sentences, repeated random tokens, simple stories.

Everything is generated from word lists and templates with a seeded `random.Random`, so a seed fixes
a data set. Names and IOI templates are split into a training part and a held-out part: held-out
names never appear in a training IOI sentence (they do appear in stories and, as any token may, in
repeated random sequences, so their embeddings are trained), held-out templates never appear in
training at all (their words all occur in training text).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lenskit.zoo.tokenizer import SPECIAL_TOKENS, pieces

NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Anna",
    "Paul",
    "Kate",
    "Mark",
    "Laura",
    "Mike",
    "Jane",
    "Chris",
    "Rose",
    "Sam",
    "Lucy",
    "Jack",
    "Helen",
    "Frank",
    "Grace",
    "Henry",
    "Claire",
    "Max",
    "Julia",
    "Adam",
    "Nina",
    "Ben",
    "Sophie",
    "Eric",
    "Clara",
    "Leo",
    "Ruth",
    "Alex",
    "George",
    "Emily",
    "Harry",
    "Olivia",
    "Jacob",
    "Ella",
    "Noah",
    "Mia",
    "Luke",
    "Zoe",
    "Ryan",
    "Hannah",
    "Simon",
    "Megan",
    "Victor",
    "Diana",
    "Carl",
    "Fiona",
    "Ivan",
    "Irene",
    "Hugo",
    "Maria",
    "Oliver",
    "Susan",
    "Steve",
    "Karen",
    "Brian",
    "Linda",
    "Kevin",
    "Nancy",
    "Gary",
    "Betty",
    "Larry",
    "Donna",
    "Scott",
    "Carol",
    "Tony",
    "Ruby",
    "Owen",
    "Wendy",
    "Ian",
    "Jill",
    "Neil",
    "Molly",
    "Ted",
    "Eva",
    "Roy",
    "Tina",
    "Joe",
    "Beth",
    "Carlos",
    "Lily",
    "Dylan",
    "Ada",
    "Felix",
    "Ivy",
    "Arthur",
    "Edith",
    "Walter",
    "Agnes",
    # held out of the training IOI sentences:
    "Alice",
    "Bob",
    "Sarah",
    "David",
    "Emma",
    "Peter",
    "Lisa",
    "Oscar",
    "Kyle",
    "Nora",
    "Sean",
    "Jenny",
    "Philip",
    "Cathy",
    "Bruce",
    "Heidi",
]
EVAL_NAMES = NAMES[-16:]
"""Names held out of the training IOI sentences."""
TRAIN_NAMES = NAMES[:-16]
PLACES = [
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
    "park",
    "beach",
    "library",
    "market",
    "cafe",
    "church",
    "museum",
    "zoo",
    "farm",
    "bank",
    "shop",
    "lake",
]
OBJECTS = [
    "drink",
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "snack",
    "apple",
    "bag",
    "book",
    "ball",
    "cake",
    "letter",
    "flower",
    "key",
    "hat",
    "cup",
    "pen",
    "gift",
]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow", "duck", "frog"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black"]
FEELINGS = ["happy", "sad", "tired", "hungry", "big", "small"]
THINGS = ["mat", "bed", "chair", "table", "rug", "box"]

# {A} and {B} are the two names in order of appearance, {S} the subject who repeats. ABBA: A is the
# indirect object and B the subject; BABA: A is the subject and B the indirect object.
PAPER_TEMPLATES = [
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {A} and {B} were working at the {place}. {S} decided to give a {object} to",
    "Then, {A} and {B} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give the {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "While {A} and {B} were commuting to the {place}, {S} gave a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "The {place} {A} and {B} went to had a {object}. {S} gave it to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
]
"""The IOI paper's fifteen sentence templates (Wang et al. 2022, appendix), cut before the answer: {A} and {B}
are the two names in order of first mention, {S} the subject's second mention. With S = B a sentence is ABBA
(the IO comes first), with S = A it is BABA."""

TRAIN_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    *PAPER_TEMPLATES,
    "Yesterday, {A} and {B} met at the {place}. {S} handed a {object} to",
    "Once {A} and {B} arrived at the {place}, {S} passed the {object} to",
    # the subject after words that open the first name's clause in other templates ("and", "then"):
    "{A} and {B} went to the {place}, and then {S} gave a {object} to",
    "At the {place}, {A} and {B} found a {object}, and {S} gave it to",
    "In the morning, {A} and {B} went to the {place}. Then {S} gave a {object} to",
    "{A} and {B} were at the {place}, so {S} gave a {object} to",
    "{A} and {B} were at the {place}, but {S} handed the {object} to",
    "{A} and {B} had a {object}. Later {S} gave it to",
]
EVAL_TEMPLATES = [
    "Later, {A} and {B} went to the {place}, and {S} gave a {object} to",
    "Yesterday, {A} and {B} found a {object} at the {place}. Then {S} passed it to",
    "While {A} and {B} had fun at the {place}, {S} wanted to give a {object} to",
    "After {A} and {B} got a {object} at the {place}, {S} handed it to",
    "When {A} and {B} arrived at the {place}, {S} decided to give a {object} to",
    "Once {A} and {B} met at the {place}, {S} said to",
]
"""IOI templates never used in training."""

STORY_SENTENCES = [
    "The {animal} sat on the {thing}.",
    "{name} likes the {colour} {object}.",
    "{name} went to the {place}.",
    "{name} has a {colour} {animal}.",
    "The {animal} is {feeling}.",
    "{name} saw a {animal} at the {place}.",
    "{name} was {feeling}.",
    "Then {name} went home.",
    "Later, {name} found a {object} in the {place}.",
    "{name} said hello to the {animal}.",
    "The {object} was {colour}.",
    "{name} and the {animal} played in the {place}.",
    "Yesterday, {name} had a lot of fun.",
    "{name} gave the {animal} a {object}.",
    "The {animal} ran to the {place}.",
    "The {animal} likes {name}.",
    "{name} and {other} played in the {place}.",
    "{other} gave {name} a {object}.",
    "{name} saw {other} at the {place}.",
    "{other} was {feeling}, so {name} said hello.",
]

PLACEHOLDER = re.compile(r"\{\w+\}")


@dataclass
class IOIExample:
    prompt: str
    io: str
    subject: str

    @property
    def text(self) -> str:
        """The whole sentence, as seen in training: prompt, indirect object, full stop."""
        return f"{self.prompt} {self.io}."


def ioi_example(rng: random.Random, names: list[str], templates: list[str]) -> IOIExample:
    """One IOI sentence: ABBA or BABA with equal probability, two distinct names."""
    io, subject = rng.sample(names, 2)
    first, second = (io, subject) if rng.random() < 0.5 else (subject, io)
    prompt = rng.choice(templates).format(
        A=first, B=second, S=subject, place=rng.choice(PLACES), object=rng.choice(OBJECTS)
    )
    return IOIExample(prompt, io, subject)


def ioi_dataset(n: int, seed: int = 0, held_out: bool = True) -> list[IOIExample]:
    """`n` IOI examples: held-out names in held-out templates (default), or the training ones."""
    rng = random.Random(seed)
    names, templates = (EVAL_NAMES, EVAL_TEMPLATES) if held_out else (TRAIN_NAMES, TRAIN_TEMPLATES)
    return [ioi_example(rng, names, templates) for _ in range(n)]


def story(rng: random.Random) -> str:
    """Two to four simple sentences about one or two characters (any names, held-out ones included):
    the model learns to copy names from the context."""
    sentences = rng.choices(STORY_SENTENCES, k=rng.randint(2, 4))
    name, other = rng.sample(NAMES, 2)
    return " ".join(
        s.format(
            name=name,
            other=other,
            animal=rng.choice(ANIMALS),
            thing=rng.choice(THINGS),
            colour=rng.choice(COLOURS),
            object=rng.choice(OBJECTS),
            place=rng.choice(PLACES),
            feeling=rng.choice(FEELINGS),
        )
        for s in sentences
    )


def vocabulary() -> list[str]:
    """Every piece of the training text, sorted: template and story words (a story sentence may start
    a story or follow another one), each word list word with and without its leading space."""
    words = [*NAMES, *PLACES, *OBJECTS, *ANIMALS, *COLOURS, *FEELINGS, *THINGS]
    texts = [*TRAIN_TEMPLATES, *STORY_SENTENCES, *(" " + s for s in STORY_SENTENCES), *words, *(" " + w for w in words)]
    return sorted({p for text in texts for p in pieces(PLACEHOLDER.sub("", text))})


def training_batch(
    tokenizer: Tokenizer,
    rng: random.Random,
    batch_size: int,
    mixture: dict[str, float],
    repeat_lengths: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """A batch of the training mixture, each sequence starting with <bos>, right-padded with <pad>.

    mixture: fraction of sequences of each kind, {"ioi": ..., "repeated": ..., "stories": ...}.
    repeat_lengths: a repeated-token sequence is <bos> R R with len(R) uniform in this range (inclusive).
    Returns tokens [batch, pos] and a mask [batch, pos] that is True on real tokens.
    """
    bos = tokenizer.token_to_id(SPECIAL_TOKENS["bos_token"])
    pad = tokenizer.token_to_id(SPECIAL_TOKENS["pad_token"])
    first_word_id = len(SPECIAL_TOKENS)
    kinds = rng.choices(list(mixture), weights=list(mixture.values()), k=batch_size)
    texts = [
        ioi_example(rng, TRAIN_NAMES, TRAIN_TEMPLATES).text if kind == "ioi" else story(rng)
        for kind in kinds
        if kind != "repeated"
    ]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
    sequences = []
    for kind in kinds:
        if kind == "repeated":
            half = [
                rng.randrange(first_word_id, tokenizer.get_vocab_size()) for _ in range(rng.randint(*repeat_lengths))
            ]
            sequences.append([bos, *half, *half])
        else:
            sequences.append([bos, *next(encoded).ids])
    length = max(map(len, sequences))
    tokens = torch.full((batch_size, length), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    return tokens, tokens != pad
