"""Checkpoints: every parameter and the fit's metadata in one `.npz`, written and read without pickle.

Layout of the file (all plain numeric arrays, so `np.load(..., allow_pickle=False)` reads it):

- `gamma`, `beta`, `moving_mean`, `moving_var`: shape (C,), the layer's dtype;
- `head_weight` (C, K) and `head_bias` (K,): only when a linear head was trained;
- `trace_samples` (T,), `trace_mean` (T, C), `trace_var` (T, C): only when the fit recorded the moving
  statistics' trajectory (samples seen at each record, then the statistics at that point);
- `metadata`: the UTF-8 bytes of a JSON object, stored as a uint8 array (see `Checkpoint` for its keys).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from bn_export.errors import CheckpointError
from bn_export.files import write_atomically

FORMAT_VERSION = 1
StatsKind = Literal["ema", "population"]
_PARAMETERS = ("gamma", "beta", "moving_mean", "moving_var")
_TRACE = ("trace_samples", "trace_mean", "trace_var")


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier/regressor on the normalized features: `logits = pool(y) @ weight + bias`.

    `pool` averages over the spatial axes (identity for rank-2 input), so `weight` is (C, K).
    `loss` is the loss it was trained with: "mse" or "cross-entropy".
    """

    weight: NDArray[np.floating[Any]]
    bias: NDArray[np.floating[Any]]
    loss: str


@dataclass(frozen=True)
class Trajectory:
    """Moving statistics recorded during a fit: after `samples[t]` samples they were `mean[t]`, `var[t]`."""

    samples: NDArray[np.int64]
    mean: NDArray[np.floating[Any]]
    var: NDArray[np.floating[Any]]


@dataclass(frozen=True)
class Checkpoint:
    """A fitted BatchNorm layer and how it was fitted.

    `axis` is the channel axis of the full input, batch axis included, made non-negative (1 <= axis < rank).
    `sample_shape` is the shape of one sample (batch axis excluded) as seen in the data, so
    `(N, *sample_shape)` is a batch. `momentum` follows the ONNX/Keras convention
    (`moving = moving*momentum + batch*(1-momentum)`); None means a cumulative average (PyTorch's
    `momentum=None`). `extras` holds additional JSON-serialisable metadata (engine, partitions, ...).
    """

    gamma: NDArray[np.floating[Any]]
    beta: NDArray[np.floating[Any]]
    moving_mean: NDArray[np.floating[Any]]
    moving_var: NDArray[np.floating[Any]]
    eps: float
    momentum: float | None
    axis: int
    sample_shape: tuple[int, ...]
    stats: StatsKind
    samples_seen: int
    batches_seen: int
    data_fingerprint: str
    created: str
    version: str
    unbiased_moving_var: bool = False
    head: LinearHead | None = None
    trajectory: Trajectory | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """Rank of a batch of input (batch axis included)."""
        return len(self.sample_shape) + 1

    @property
    def num_channels(self) -> int:
        return int(self.gamma.shape[0])

    def metadata(self) -> dict[str, Any]:
        """The JSON-serialisable metadata stored beside the arrays."""
        return {
            "format_version": FORMAT_VERSION,
            "eps": self.eps,
            "momentum": self.momentum,
            "axis": self.axis,
            "sample_shape": list(self.sample_shape),
            "stats": self.stats,
            "unbiased_moving_var": self.unbiased_moving_var,
            "samples_seen": self.samples_seen,
            "batches_seen": self.batches_seen,
            "data_fingerprint": self.data_fingerprint,
            "created": self.created,
            "version": self.version,
            "dtype": str(self.gamma.dtype),
            "head_loss": None if self.head is None else self.head.loss,
            "extras": dict(self.extras),
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write `checkpoint` to `path` atomically (a temporary file renamed into place); returns the path."""
    path = Path(path)
    arrays: dict[str, NDArray[Any]] = {name: getattr(checkpoint, name) for name in _PARAMETERS}
    if checkpoint.head is not None:
        arrays["head_weight"] = checkpoint.head.weight
        arrays["head_bias"] = checkpoint.head.bias
    if checkpoint.trajectory is not None:
        arrays["trace_samples"] = checkpoint.trajectory.samples
        arrays["trace_mean"] = checkpoint.trajectory.mean
        arrays["trace_var"] = checkpoint.trajectory.var
    text = json.dumps(checkpoint.metadata(), sort_keys=True)
    arrays["metadata"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_atomically(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; raises `CheckpointError` saying what is wrong."""
    path = Path(path)
    try:
        # Our own handle: np.load leaks the file it opened when the archive turns out to be corrupt.
        with path.open("rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array, not an archive
                raise CheckpointError(f"{path}: not a checkpoint: a single array, expected an .npz archive")
            with loaded as archive:
                arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (.npz): {exc}") from exc
    return _checkpoint_from_arrays(arrays, path)


def _checkpoint_from_arrays(arrays: Mapping[str, NDArray[Any]], path: Path) -> Checkpoint:
    missing = [name for name in (*_PARAMETERS, "metadata") if name not in arrays]
    if missing:
        raise CheckpointError(f"{path}: not a frozen-bn checkpoint, missing arrays: {', '.join(missing)}")
    try:
        meta = json.loads(arrays["metadata"].astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    params = {name: np.asarray(arrays[name]) for name in _PARAMETERS}
    shapes = {p.shape for p in params.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise CheckpointError(f"{path}: gamma, beta, moving_mean, moving_var must share one (C,) shape")
    for name, value in params.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{path}: {name} has dtype {value.dtype}, expected a float type")
    channels = next(iter(shapes))[0]
    try:
        sample_shape = tuple(int(d) for d in meta["sample_shape"])
        axis = int(meta["axis"])
        momentum = None if meta["momentum"] is None else float(meta["momentum"])
        head = None
        if "head_weight" in arrays:
            weight, bias = np.asarray(arrays["head_weight"]), np.asarray(arrays["head_bias"])
            if weight.ndim != 2 or weight.shape[0] != channels or bias.shape != (weight.shape[1],):
                raise CheckpointError(f"{path}: head_weight must be (C, K) and head_bias (K,)")
            head = LinearHead(weight=weight, bias=bias, loss=str(meta["head_loss"]))
        trajectory = None
        if all(name in arrays for name in _TRACE):
            trajectory = Trajectory(
                samples=np.asarray(arrays["trace_samples"], dtype=np.int64),
                mean=np.asarray(arrays["trace_mean"]),
                var=np.asarray(arrays["trace_var"]),
            )
        checkpoint = Checkpoint(
            **params,
            eps=float(meta["eps"]),
            momentum=momentum,
            axis=axis,
            sample_shape=sample_shape,
            stats=meta["stats"],
            samples_seen=int(meta["samples_seen"]),
            batches_seen=int(meta["batches_seen"]),
            data_fingerprint=str(meta["data_fingerprint"]),
            created=str(meta["created"]),
            version=str(meta["version"]),
            unbiased_moving_var=bool(meta.get("unbiased_moving_var", False)),
            head=head,
            trajectory=trajectory,
            extras=dict(meta.get("extras") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: metadata is incomplete or malformed: {exc!r}") from exc
    if checkpoint.stats not in ("ema", "population"):
        raise CheckpointError(f"{path}: unknown statistics kind {checkpoint.stats!r}")
    if not 1 <= axis < checkpoint.rank or sample_shape[axis - 1] != channels:
        raise CheckpointError(
            f"{path}: channel axis {axis} of sample shape {sample_shape} does not hold {channels} channels"
        )
    return checkpoint
