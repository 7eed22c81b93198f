"""Reproductions of known experiments: ``lenskit reproduce NAME`` and notebooks/NAME.ipynb.

Each module has ``run(model=None, progress=True) -> Reproduction``; with no model it runs offline on
the zoo's default model (whisper-layers: the zoo's speech model). `EXPERIMENTS` maps each name to its module.
"""

from importlib import import_module

from lenskit.errors import InputError
from lenskit.experiments.reproduction import Reproduction

EXPERIMENTS = {
    "bos": "lenskit.experiments.bos",
    "tokenization": "lenskit.experiments.tokenization",
    "emotion": "lenskit.experiments.emotion",
    "layers": "lenskit.experiments.layers",
    "ioi": "lenskit.experiments.ioi",
    "whisper-layers": "lenskit.experiments.whisper_layers",
}


def run(name: str, model=None, progress: bool = True, **options) -> Reproduction:
    """Run the reproduction `name` on `model` (a HookedTransformer, a name for lenskit.load, or None for its
    default); `options` go to its module's run (e.g. ioi's and bos's ``n_frames``: a smaller IOI set)."""
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return import_module(EXPERIMENTS[name]).run(model, progress=progress, **options)


__all__ = ["EXPERIMENTS", "Reproduction", "run"]
