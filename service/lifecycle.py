"""Triton's model repository extension: list the repository, (re)load a model, unload it.

A load is atomic. Every version of the model is built into a `LoadedModel` (its files read once, verified
to hold frozen statistics, its `config.json` validated, warmed up) while the old ones keep serving; only
when all of them are READY does one assignment make them the model (`InferenceCore.commit`), and only then
do its metrics change. Requests already running finish on the old models, which they hold; later requests
get the new ones. A load that fails in any version (missing, corrupt, non-frozen, a bad `config.json`) is
refused with the reasons and changes nothing, its gauges and drift figures included. An unload marks every
version UNAVAILABLE ("unloaded") in one assignment, so new requests get 503 while running ones finish, and
removes the model's gauges and drift series.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from service.errors import LoadRefused, ModelNotFound, ServerNotReady
from service.inference import InferenceCore
from service.repository import ModelState, ModelVersion, is_valid_name, scan_model

log = logging.getLogger("bn_serve")

UNLOADED = "unloaded"
NOT_LOADED = "not loaded"


class ModelLifecycle:
    """Loads and unloads the models of `core.repository`; one operation at a time."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self._lock = threading.Lock()

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's index: `{name, version, state, reason}` per held version, plus models on disk not held
        (`{name, state: UNAVAILABLE, reason: "not loaded"}`); with `ready_only`, READY versions only."""
        entries: list[dict[str, Any]] = []
        for entry in sorted(self.core.repository, key=lambda e: (e.name, e.version)):
            if ready_only and entry.state is not ModelState.READY:
                continue
            entries.append(
                {
                    "name": entry.name,
                    "version": str(entry.version),
                    "state": entry.state.value,
                    "reason": entry.reason or "",
                }
            )
        if not ready_only:
            held = set(self.core.repository.names())
            for name in self._names_on_disk():
                if name not in held:
                    state = ModelState.UNAVAILABLE.value
                    entries.append({"name": name, "state": state, "reason": NOT_LOADED})
        return entries

    def load(self, name: str) -> None:
        """(Re)load every version of model `name` from disk and swap them in at once; blocking.

        Raises `ModelNotFound` when no such model is on disk, `ServerNotReady` before the initial load has
        finished, and `LoadRefused` (nothing changed) when any version fails to read, verify or warm up.
        """
        self._require_ready()
        with self._lock:
            versions = [self.core.build(entry) for entry in self._versions_on_disk(name)]
            failed = [entry for entry in versions if entry.state is not ModelState.READY]
            if failed:
                reasons = "; ".join(f"version {e.version}: {e.reason}" for e in failed)
                raise LoadRefused(f"model {name!r} was not loaded, the current one keeps serving: {reasons}")
            self.core.commit(name, versions)
        log.info("model %s loaded: versions %s", name, ", ".join(str(e.version) for e in versions))

    def unload(self, name: str) -> None:
        """Mark every version of model `name` UNAVAILABLE; requests already running finish."""
        self._require_ready()
        with self._lock:
            self.core.repository.versions(name)  # raises ModelNotFound for a model not held
            unloaded = [
                ModelVersion(e.name, e.version, e.path, state=ModelState.UNAVAILABLE, reason=UNLOADED)
                for e in self.core.repository.held(name)
            ]
            self.core.commit(name, unloaded, unloaded=True)
        log.info("model %s unloaded", name)

    def _require_ready(self) -> None:
        if not self.core.loaded:
            raise ServerNotReady("the models are still loading; retry once they have loaded")

    def _names_on_disk(self) -> list[str]:
        root = self.core.repository.root
        if root is None or not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and is_valid_name(p.name))

    def _versions_on_disk(self, name: str) -> list[ModelVersion]:
        """Fresh (LOADING) entries for every version of `name` on disk; the name is validated first, so
        no path is ever built from an arbitrary string."""
        repository = self.core.repository
        if not is_valid_name(name):
            raise ModelNotFound(f"no model named {name!r}: names are 1-128 of [A-Za-z0-9_.-]")
        if repository.file is not None:
            if name != repository.file.stem:
                raise ModelNotFound(f"no model named {name!r}; this server serves {repository.file.stem!r}")
            return [ModelVersion(name, 1, repository.file)]
        root = repository.root
        if root is None or not (root / name).is_dir():
            raise ModelNotFound(f"no model named {name!r} in the model repository")
        versions = scan_model(root / name)
        if not versions:
            raise LoadRefused(f"model {name!r} has no <version>/ directories in the model repository")
        return versions
