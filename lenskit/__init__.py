"""lenskit: mechanistic interpretability of transformers, as TransformerLens hook functions.

>>> import lenskit
>>> from lenskit import hooks, metrics, surgery, vocab
>>> model = lenskit.load("lenskit/<name>")        # or a TransformerLens name, a folder, a .bin
>>> h = hooks.ablate("blocks.1.attn.hook_z", head=3) + hooks.cache("blocks.*.hook_resid_post")
>>> logits = model.run_with_hooks(model.to_tokens("Hello"), fwd_hooks=h)
"""

from lenskit import hooks, metrics, surgery, vocab
from lenskit.attribution import attribute
from lenskit.cache import decompose_residual, residual_stream
from lenskit.flow import FlowGraph, flow
from lenskit.hooks import Hooks
from lenskit.labelled import LabelledTensor
from lenskit.lens import LensResult, logit_lens
from lenskit.models import load, save, zoo_names
from lenskit.patching import attribution_patch, patch
from lenskit.path_patching import path_patch
from lenskit.run import Run
from lenskit.shards import load_cache, stream_cache

__all__ = [
    "hooks",
    "Hooks",
    "LabelledTensor",
    "load",
    "save",
    "zoo_names",
    "residual_stream",
    "decompose_residual",
    "stream_cache",
    "load_cache",
    "attribute",
    "logit_lens",
    "LensResult",
    "patch",
    "attribution_patch",
    "path_patch",
    "metrics",
    "flow",
    "FlowGraph",
    "surgery",
    "vocab",
    "Run",
]
