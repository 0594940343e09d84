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
from service.observability import DriftWatch, LayerDriftWatch, Observability
from service.runtime import Session
from service.symlinks import check_inside
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
    follow_symlinks: bool = False
    observability: Observability | None = None


@dataclass(frozen=True)
class LoadedModel:
    """Everything served for one version of one model, fixed at its load.

    `drift` watches frozen-bn's one-layer graph at its input, `layer_drift` any other network at every
    BatchNormalization layer; with neither, `drift_reason` says why. `labels` are the metric label values
    `(name, version)` and `metrics` the version's series, looked up once (None without observability).
    """

    name: str
    version: int
    session: Session = field(repr=False)
    verification: dict[str, Any] = field(repr=False)
    policy: BatchPolicy
    drift: DriftWatch | None = field(repr=False)
    drift_reason: str | None
    labels: tuple[str, str]
    batching_note: str | None = None
    layer_drift: LayerDriftWatch | None = field(default=None, repr=False)
    metrics: ModelMetrics | None = field(default=None, repr=False, compare=False)


def load_model(
    name: str, version: int, path: Path, model_dir: Path | None, options: LoadOptions
) -> LoadedModel:
    """Load version `version` of model `name` from `path` (and `model_dir/config.json`, if any).

    Raises `ModelLoadError` with the reason when the file cannot be read or is not ONNX, onnxruntime refuses
    it, it fails the frozen-statistics checks, its `config.json` is invalid, or its warm-up run fails.
    """
    what = f"model {name!r} version {version}"
    # A repository's files are read only where they resolve inside it (`service.symlinks`).
    check_inside(
        path, None if model_dir is None else model_dir.parent, follow_symlinks=options.follow_symlinks
    )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what}'s {path.name}: {exc.strerror or exc}") from None
    proto = parse_model(data, what)
    session = Session(path, options.providers, options.intra_op_threads, data=data)
    verification = verify_frozen(proto, session.providers, what, budget_s=options.verify_budget_s)
    policy, batching_note = exact_policy(
        read_policy(model_dir, options.default_policy, name, follow_symlinks=options.follow_symlinks),
        verification,
    )
    if batching_note is not None:
        log.warning("%s: %s", what, batching_note)
    if options.warmup:
        _warm_up(session)
    drift: DriftWatch | None = None
    drift_reason: str | None = None
    layer_drift: LayerDriftWatch | None = None
    if options.observability is not None:
        drift, drift_reason, layer_drift = _drift_watches(
            proto, session, name, version, options.observability
        )
        if drift is None and layer_drift is None:
            log.warning("%s: no drift monitoring: %s", what, drift_reason)
    return LoadedModel(
        name=name,
        version=version,
        session=session,
        verification=verification,
        policy=policy,
        drift=drift,
        drift_reason=drift_reason,
        layer_drift=layer_drift,
        labels=(name, str(version)),
        batching_note=batching_note,
        metrics=None
        if options.observability is None
        else options.observability.metrics.for_model(name, str(version)),
    )


def _drift_watches(
    proto: Any, session: Session, name: str, version: int, observability: Observability
) -> tuple[DriftWatch | None, str | None, LayerDriftWatch | None]:
    """How a model's drift is watched: frozen-bn's own one-layer graph (or its folded form) at its input,
    as the layer's statistics describe it; any other network with BatchNormalization layers at every
    layer's input (a probe session built here). Returns the input watch or None and why, and the layer
    watch or None. Never raises: the model serves without drift figures rather than not at all."""
    from bn_export.graph_statistics import FrozenStatistics, frozen_bn_statistics
    from bn_export.onnx_graph import GraphIndex
    from bn_export.verify import find_statistics  # loads onnx's checker: only with models

    version_label = str(version)
    try:
        layered = not isinstance(frozen_bn_statistics(GraphIndex(proto)), FrozenStatistics) and any(
            node.op_type == "BatchNormalization" for node in proto.graph.node
        )
        if layered:
            layer_watch, reason = observability.layer_watch(proto, session.providers, name, version_label)
            if layer_watch is not None:
                return None, None, layer_watch
            return None, reason, None
        statistics: Any = find_statistics(proto)
        drift, reason = observability.watch(
            statistics, [spec.name for spec in session.inputs], name, version_label
        )
    except Exception as exc:  # the model serves without drift figures rather than not at all
        return None, f"reading the frozen statistics failed: {exc!r}", None
    return drift, reason, None


def exact_policy(policy: BatchPolicy, verification: dict[str, Any]) -> tuple[BatchPolicy, str | None]:
    """`policy`, with merging turned off where it would not be exact, and why.

    Merged runs are exact when every output of a sample is bitwise the same alone and inside a batch, which
    `batch_invariance` measured at load (its figure is the largest deviation). On the CPU every graph
    frozen-bn serves has shown 0; on CUDA, cuBLAS and cuDNN choose GEMM and convolution kernels by batch
    size, so a network's logits can move in their last bits with the batch (within the rounding bound the
    check allows). Such a model is served with each request run as sent, so that an answer never depends on
    which other requests arrived with it.
    """
    if not policy.enabled:
        return policy, None
    checks = verification.get("checks", [])
    figure = next((c.get("figure") for c in checks if c.get("name") == "batch_invariance"), None)
    if figure == 0:
        return policy, None
    note = (
        f"adaptive batching is off: outputs moved by up to {figure} between a sample alone and in a batch "
        "(within float rounding, so the model passed), and merged runs must give each request the bits it "
        "gets alone"
    )
    return BatchPolicy(1, 0), note


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
