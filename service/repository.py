"""Models on disk: a Triton-style repository `DIR/<name>/<version>/model.onnx`, or one file, and what each
version's load made of it.

Names and versions come from directory names and from URLs, so both are validated: a name is 1-128 of
`[A-Za-z0-9_.-]` starting with a letter or digit (so never `.`, `..` or a path), a version is a decimal
integer without leading zeros. Lookups go through a dict built from the disk scan, never through a path
built from the request.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import ConfigurationError, ModelNotFound

if TYPE_CHECKING:
    from service.model import LoadedModel
    from service.runtime import Session

log = logging.getLogger("bn_serve")

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"0|[1-9][0-9]{0,17}")


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def parse_version(text: str) -> int | None:
    """The version number in `text`, or None when it is not a canonical decimal integer."""
    return int(text) if _VERSION.fullmatch(text) else None


class ModelState(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model as the repository holds it: where it is on disk and what its load made of
    it, READY with its `LoadedModel`, or LOADING/UNAVAILABLE with the reason. Never changed: a load or an
    unload builds new entries and swaps them in (`ModelRepository.replace`)."""

    name: str
    version: int
    path: Path
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    model: LoadedModel | None = field(default=None, repr=False)
    load_seconds: float | None = None

    @property
    def session(self) -> Session | None:
        return None if self.model is None else self.model.session

    @property
    def verification(self) -> dict[str, Any] | None:
        return None if self.model is None else self.model.verification

    @property
    def model_directory(self) -> Path | None:
        """`DIR/<name>` of a repository entry (`DIR/<name>/<version>/model.onnx`); None for a single file."""
        path = self.path
        if (
            path.name == MODEL_FILE
            and path.parent.name == str(self.version)
            and path.parent.parent.name == self.name
        ):
            return path.parent.parent
        return None


class ModelRepository:
    """Every version of every model, looked up by name and optional version (default: the highest)."""

    def __init__(self, versions: list[ModelVersion]) -> None:
        self._models: dict[str, dict[int, ModelVersion]] = {}
        for entry in versions:
            self._models.setdefault(entry.name, {})[entry.version] = entry
        # Where the models came from, for reloads: a repository directory, or one file.
        self.root: Path | None = None
        self.file: Path | None = None

    @classmethod
    def scan(cls, root: Path) -> ModelRepository:
        """The models under `root`; entries with invalid names or versions are skipped with a warning."""
        if not root.is_dir():
            raise ConfigurationError(f"model repository {root} is not a directory")
        versions = []
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if not is_valid_name(model_dir.name):
                log.warning("skipping %s: not a valid model name", model_dir)
                continue
            versions.extend(scan_model(model_dir))
        if not versions:
            raise ConfigurationError(f"model repository {root} holds no <name>/<version>/ directories")
        repository = cls(versions)
        repository.root = root
        return repository

    @classmethod
    def single(cls, path: Path) -> ModelRepository:
        """One model file served as version 1 under the name of its stem."""
        if not path.is_file():
            raise ConfigurationError(f"model file {path} does not exist")
        if not is_valid_name(path.stem):
            raise ConfigurationError(f"model file name {path.name!r}: its stem must match {_NAME.pattern}")
        repository = cls([ModelVersion(path.stem, 1, path)])
        repository.file = path
        return repository

    def held(self, name: str) -> list[ModelVersion]:
        """The entries of model `name`, by version ascending; [] for a model not held."""
        versions = self._models.get(name, {})
        return [versions[v] for v in sorted(versions)]

    def names(self) -> list[str]:
        """The names of the models held, sorted."""
        return sorted(self._models)

    def replace(self, name: str, versions: list[ModelVersion]) -> None:
        """Serve `versions` as model `name` from now on, all at once.

        One dict assignment, so a lookup sees either every old version or every new one; requests that
        already hold an old version's session finish on it.
        """
        self._models[name] = {entry.version: entry for entry in versions}

    def __iter__(self) -> Iterator[ModelVersion]:
        # A snapshot: a reload may replace a model while the caller iterates.
        for versions in list(self._models.values()):
            yield from list(versions.values())

    def versions(self, name: str) -> list[int]:
        """The version numbers of model `name`, ascending; raises `ModelNotFound`."""
        return sorted(self._versions_of(name))

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """Model `name` at `version` (a URL segment), or its highest version; raises `ModelNotFound`."""
        versions = self._versions_of(name)
        if version is None:
            return versions[max(versions)]
        number = parse_version(version)
        if number is None or number not in versions:
            known = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {known}")
        return versions[number]

    def _versions_of(self, name: str) -> dict[int, ModelVersion]:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r}; models: {', '.join(sorted(self._models))}"
            ) from None


def scan_model(model_dir: Path) -> list[ModelVersion]:
    """The versions under `model_dir`: `<version>/model.onnx` with integer names, others skipped (warned)."""
    versions = []
    for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        number = parse_version(version_dir.name)
        if number is None:
            log.warning("skipping %s: version directories are named by integers", version_dir)
            continue
        versions.append(ModelVersion(model_dir.name, number, version_dir / MODEL_FILE))
    return versions
