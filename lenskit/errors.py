"""lenskit's own errors: what a user can catch, and what the CLI turns into one line and exit code 2.

Each subclasses the built-in error a caller would already expect, so ``except ValueError`` and
``except FileNotFoundError`` written before these existed keep working::

    LenskitError                      anything lenskit refuses on purpose
      InputError(ValueError)          a bad argument: names the argument, the value and what is valid
      ModelFileError(ValueError)      a file or folder that is not the model it claims to be
      MissingFileError(FileNotFoundError)   a path that does not exist
      BackendError(NotImplementedError)     a feature the installed TransformerLens (3.9 or 4.x) lacks
"""

from __future__ import annotations


class LenskitError(Exception):
    """Base of every error lenskit raises on purpose (never for a bug in lenskit itself)."""


class InputError(LenskitError, ValueError):
    """An argument outside what the function accepts; the message names it, its value and what is valid."""


class ModelFileError(LenskitError, ValueError):
    """A model file or folder that cannot be read as what it claims to be (names the file and what is wrong)."""


class MissingFileError(LenskitError, FileNotFoundError):
    """A path that does not exist (names the path, and what was expected there)."""


class BackendError(LenskitError, NotImplementedError):
    """A feature the installed TransformerLens lacks (names the feature, the version it needs and why)."""
