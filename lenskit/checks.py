"""Checks of plain arguments (counts, indices, numbers): the type half, shared by every function.

    integer(top_k, "top_k", low=1)          # an int (numpy and 0-d tensor ints too), not a bool, float or str
    integers(layers, "layers")              # an int or a sequence / 1-d tensor of ints -> list[int]
    number(threshold, "threshold", 0, 1)    # a finite real number

Each raises `InputError` naming the argument, the value and what is valid. A float is never
truncated to an int and a string never read as a list of digits (``"10"`` is not heads 1 and 0).
Range checks that depend on the model (a layer below n_layers) stay with the function that knows
the range, and say it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lenskit.errors import InputError


def is_integer(value: Any) -> bool:
    """Whether `value` is a whole number given as an integer type (numpy and 0-d integer tensors included)."""
    if isinstance(value, torch.Tensor):
        return (
            value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def integer(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, checked to lie in low..high (either bound may be None)."""
    if not is_integer(value):
        raise InputError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        valid = (
            f"{low}..{high}"
            if low is not None and high is not None
            else f"at least {low}"
            if low is not None
            else f"at most {high}"
        )
        raise InputError(f"{what}={value} is out of range: valid {valid}")
    return value


def integers(value: Any, what: str) -> list[int]:
    """An int or a sequence (list, tuple, range, 1-d integer tensor or array) of ints, as a list."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1:
        value = value.tolist()
    if is_integer(value):
        return [int(value)]
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range)):
        raise InputError(f"{what} must be an int or a list of ints, got {value!r} ({type(value).__name__})")
    bad = [item for item in value if not is_integer(item)]
    if bad:
        raise InputError(f"{what} must be an int or a list of ints; {bad[0]!r} in {list(value)!r} is not an int")
    return [int(item) for item in value]


def number(value: Any, what: str, low: float | None = None, high: float | None = None) -> float:
    """`value` as a finite float, checked to lie in [low, high] (either bound may be None)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(
            f"{what}={value} is out of range: valid {low if low is not None else '-inf'}.."
            f"{high if high is not None else 'inf'}"
        )
    return float(value)
