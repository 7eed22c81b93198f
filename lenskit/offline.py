"""lenskit reaches no network unasked: loading a local file never waits for a model hub."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import huggingface_hub.constants


@contextmanager
def hf_offline() -> Iterator[None]:
    """Make huggingface_hub (and so transformers) refuse any network access inside the block."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
