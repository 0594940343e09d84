"""A loaded model: one immutable value built from one read of a version's files.

`load_model` reads `model.onnx` once and `config.json` once; from those bytes it builds the onnxruntime
session, verifies the graph's frozen statistics, reads the statistics for the drift monitor, validates the
batching policy and warms the session up. Whatever fails refuses the load with a reason that names the model
and version, never a path on the server. Nothing reads the files again: later changes to them (rewritten,
truncated, deleted) reach the server only through another load.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.batching import BatchPolicy, read_policy
from service.datatypes import numpy_dtype
from service.errors import ModelLoadError
from service.metrics import ModelMetrics
from service.observability import DriftWatch, Observability
from service.runtime import Session
from service.verification import parse_model, verify_frozen

log = logging.getLogger("bn_serve")


@dataclass(frozen=True)
class LoadOptions:
    """What every load shares: where sessions run, whether to warm them up, the server's batching policy
    (a model's `config.json` overrides it), and the observability whose drift settings the watch follows."""

    providers: list[str]
    intra_op_threads: int
    warmup: bool = True
    default_policy: BatchPolicy = field(default_factory=BatchPolicy)
    verify_budget_s: float | None = None
    observability: Observability | None = None


@dataclass(frozen=True)
class LoadedModel:
    """Everything served for one version of one model, fixed at its load.

    `drift` is None when its inputs are not watched, `drift_reason` then says why; `labels` are the metric
    label values `(name, version)` and `metrics` the version's series, looked up once (None without
    observability).
    """

    name: str
    version: int
    session: Session = field(repr=False)
    verification: dict[str, Any] = field(repr=False)
    policy: BatchPolicy
    drift: DriftWatch | None = field(repr=False)
    drift_reason: str | None
    labels: tuple[str, str]
    metrics: ModelMetrics | None = field(default=None, repr=False, compare=False)


def load_model(
    name: str, version: int, path: Path, model_dir: Path | None, options: LoadOptions
) -> LoadedModel:
    """Load version `version` of model `name` from `path` (and `model_dir/config.json`, if any).

    Raises `ModelLoadError` with the reason when the file cannot be read or is not ONNX, onnxruntime refuses
    it, it fails the frozen-statistics checks, its `config.json` is invalid, or its warm-up run fails.
    """
    what = f"model {name!r} version {version}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what}'s {path.name}: {exc.strerror or exc}") from None
    proto = parse_model(data, what)
    session = Session(path, options.providers, options.intra_op_threads, data=data)
    verification = verify_frozen(proto, session.providers, what, budget_s=options.verify_budget_s)
    policy = read_policy(model_dir, options.default_policy, name)
    if options.warmup:
        _warm_up(session)
    drift: DriftWatch | None = None
    drift_reason: str | None = None
    if options.observability is not None:
        try:
            from bn_export.verify import find_statistics  # loads onnx's checker: only with models

            statistics: Any = find_statistics(proto)
            drift, drift_reason = options.observability.watch(
                statistics, [spec.name for spec in session.inputs], name, str(version)
            )
        except Exception as exc:  # the model serves without drift figures rather than not at all
            drift, drift_reason = None, f"reading the frozen statistics failed: {exc!r}"
        if drift is None:
            log.warning("%s: no drift monitoring: %s", what, drift_reason)
    return LoadedModel(
        name=name,
        version=version,
        session=session,
        verification=verification,
        policy=policy,
        drift=drift,
        drift_reason=drift_reason,
        labels=(name, str(version)),
        metrics=None
        if options.observability is None
        else options.observability.metrics.for_model(name, str(version)),
    )


def timed_load(
    name: str, version: int, path: Path, model_dir: Path | None, options: LoadOptions
) -> tuple[LoadedModel | None, str | None, float]:
    """`load_model`, never raising: the model or None and why, and the seconds the load took."""
    started = time.perf_counter()
    try:
        model = load_model(name, version, path, model_dir, options)
    except ModelLoadError as exc:
        reason: str | None = str(exc)
        model = None
        log.error("model %s version %d is not ready: %s", name, version, exc)
    except Exception as exc:  # a fault in a checker or runtime must not take the other models down
        model, reason = None, f"unexpected error while loading: {exc!r}"
        log.exception("model %s version %d is not ready", name, version)
    else:
        reason = None
    seconds = time.perf_counter() - started
    if model is not None:
        log.info(
            "model %s version %d ready in %.2fs on %s",
            name,
            version,
            seconds,
            ", ".join(model.session.providers),
        )
    return model, reason, seconds


def _warm_up(session: Session) -> None:
    """One run on zeros, every dynamic dimension 1, so the first request does not pay for allocation."""
    feeds = {
        spec.name: np.zeros([1 if d is None else d for d in spec.shape], dtype=numpy_dtype(spec.datatype))
        for spec in session.inputs
    }
    try:
        session.run([spec.name for spec in session.outputs], feeds)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelLoadError(f"the warm-up run failed: {exc}") from None
