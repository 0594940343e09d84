"""Fit a BatchNorm layer's statistics (and optionally gamma, beta and a linear head) on a dataset on disk.

Two kinds of frozen statistics (`stats`):

- `"ema"`: the layer's moving statistics after the passes over the data, updated batch by batch with
  `moving = moving*momentum + batch_stat*(1 - momentum)` (or the cumulative average for momentum None), as
  a training framework would leave them.
- `"population"`: the exact mean and variance of every value of each channel over the whole dataset, in
  float64 through mergeable `Moments` ("precise BN", Wu & Johnson 2021) -- what inference should use.
  Without a head the statistics do not depend on the order of the data, so one pass is made whatever
  `epochs` says.

Without targets gamma = 1 and beta = 0, and a statistics-only pass never normalizes: each batch's
statistics come from `Moments.from_batch` and go to `BatchNorm.update_statistics`. With targets and
`head="linear"`, gamma, beta and the head are trained jointly for `epochs` over shuffled batches, the layer
in training mode (normalizing with batch statistics) and back-propagating through its backward pass; the
frozen statistics are then the EMA left by training or a population pass, as chosen.

The moving statistics' trajectory is recorded at most `MAX_TRAJECTORY_POINTS` times (every few batches)
into the checkpoint, so a report can set the EMA against the population statistics. A fit is
deterministic: the same data, arguments and seed give the same checkpoint, `created` aside.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

import bn_export
from bn_export.checkpoint import Checkpoint, LinearHead, StatsKind, Trajectory
from bn_export.data import (
    PREFETCH_BYTES,
    Batch,
    BatchGroup,
    Dataset,
    describe_nonfinite,
    load_targets,
    open_dataset,
    prefetched,
)
from bn_export.errors import DataError, InvalidInputError
from bn_export.head import (
    LOSSES,
    OPTIMIZERS,
    SGD,
    Adam,
    LossName,
    OptimizerName,
    init_linear,
    linear,
    linear_backward,
    loss_and_grad,
    make_optimizer,
    pool,
    pool_backward,
)
from bn_export.layer import BatchNorm, normalize_axis
from bn_export.moments import Moments, merge_rows, per_batch_moments

#: Statistics passes over batches smaller than this sum them a shuffle block at a time (`_fold_group`).
GROUPED_BATCH_BYTES = 4 << 20
#: The trajectory is recorded every `ceil(batches / MAX_TRAJECTORY_POINTS)` batches, plus the final state.
MAX_TRAJECTORY_POINTS = 200
DEFAULT_LR = 0.03  # Adam on BN-normalized features; 3 epochs of the digits demo reach ~92% accuracy


@dataclass
class _Recorder:
    """Moving statistics sampled every `every` batches (and once at the end)."""

    every: int
    samples: list[int] = field(default_factory=list)
    mean: list[NDArray[Any]] = field(default_factory=list)
    var: list[NDArray[Any]] = field(default_factory=list)

    def record(self, layer: BatchNorm, *, final: bool = False) -> None:
        due = layer.batches_seen % self.every == 0
        if (
            (due or final)
            and layer.batches_seen
            and (not self.samples or self.samples[-1] != layer.samples_seen)
        ):
            self.samples.append(layer.samples_seen)
            self.mean.append(layer.moving_mean.copy())
            self.var.append(layer.moving_var.copy())

    def record_folded(
        self, batches_before: int, samples_after: NDArray[Any], means: NDArray[Any], variances: NDArray[Any]
    ) -> None:
        """What `record` would have taken after each of the batches `BatchNorm.fold_batches` folded:
        `samples_after[g]` samples seen and `means[g]`, `variances[g]` stored after batch g."""
        for g in range(len(samples_after)):
            if (batches_before + g + 1) % self.every == 0 and (
                not self.samples or self.samples[-1] != int(samples_after[g])
            ):
                self.samples.append(int(samples_after[g]))
                self.mean.append(means[g].copy())
                self.var.append(variances[g].copy())

    def trajectory(self) -> Trajectory | None:
        if not self.samples:
            return None
        return Trajectory(
            samples=np.asarray(self.samples, dtype=np.int64), mean=np.stack(self.mean), var=np.stack(self.var)
        )


def _moments(batch: Batch, axis: int, path: Path) -> Moments:
    """`Moments.from_batch`, with a NaN/Inf turned into a `DataError` that names the sample."""
    try:
        # One thread: the second core reads ahead (`prefetched`), which measured faster than splitting
        # each batch's BLAS sums over both cores (benchmarks/README.md, "Fitting").
        return Moments.from_batch(batch.data, axis, workers=1)
    except InvalidInputError as exc:
        raise DataError(f"{describe_nonfinite(batch, path)}: {exc}") from exc


def _read_ahead(batches: Iterator[Batch], dataset: Dataset, batch_size: int) -> Iterator[Batch]:
    """`batches`, prefetched on a helper thread when they are large enough for that to pay."""
    return prefetched(batches) if batch_size * dataset.sample_bytes >= PREFETCH_BYTES else batches


def _values_per_channel(batch: Batch, channels: int) -> int:
    return int(batch.data.size) // channels


def _check_labels(targets: NDArray[Any], path: str) -> NDArray[np.int64]:
    """Class labels `(N,)` in `0..K-1` as int64; floats are accepted only when every value is integral."""
    if targets.ndim != 1:
        raise DataError(
            f"{path}: cross-entropy needs (N,) class labels, got targets of shape {targets.shape}"
        )
    if targets.dtype.kind == "f" and not np.array_equal(targets, np.round(targets)):
        raise DataError(f"{path}: cross-entropy needs integer class labels, the targets hold fractions")
    labels = targets.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: class labels must be >= 0, found {labels.min()}")
    return labels


def _check_options(
    batch_size: int, epochs: int, stats: str, head: str | None, loss: str, optimizer: str, eps: float
) -> None:
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if stats not in ("ema", "population"):
        raise InvalidInputError(f"stats must be 'ema' or 'population', got {stats!r}")
    if head not in (None, "linear"):
        raise InvalidInputError(f"head must be None or 'linear', got {head!r}")
    if loss not in LOSSES:
        raise InvalidInputError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise InvalidInputError(f"eps must be a positive finite number, got {eps!r}")


def progress_bar(enabled: bool, total: int, desc: str) -> tqdm[Any]:
    """A tqdm bar on stderr when asked for and stderr is a terminal; silent otherwise."""
    return tqdm(
        total=total,
        desc=desc,
        unit="sample",
        unit_scale=True,
        leave=False,
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
    )


def _layer_dtype(dataset: Dataset) -> np.dtype[Any]:
    """float64 data keeps float64 parameters; everything else (float32/16, integers) gets float32."""
    return np.dtype(np.float64 if dataset.dtype == np.float64 else np.float32)


def _statistics_pass(
    dataset: Dataset,
    layer: BatchNorm,
    channel: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    recorder: _Recorder,
    bar: tqdm[Any],
) -> Moments:
    """One pass of per-batch `Moments`: each folded into the layer's EMA and merged into the population."""
    total = Moments.empty(layer.num_channels)
    if batch_size * dataset.sample_bytes < GROUPED_BATCH_BYTES:
        groups = dataset.batch_groups(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
        # A group is about GROUP_BYTES: always large enough for reading ahead to pay.
        for group in prefetched(groups):
            total = total.merge(_fold_group(group, dataset, layer, channel, batch_size, recorder))
            bar.update(sum(len(batch.indices) for batch in group.batches))
        return total
    # Per-batch moments depend on which samples share a batch, not on their order within it.
    batches = dataset.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch, storage_order=True)
    for batch in _read_ahead(batches, dataset, batch_size):
        part = _moments(batch, channel, dataset.path)
        total = total.merge(part)
        # A batch with one value per channel has no variance to fold into the EMA (the update needs >= 2).
        if part.count >= 2:
            layer.update_statistics(part.mean, part.variance(), part.count, samples=len(batch.indices))
            recorder.record(layer)
        bar.update(len(batch.indices))
    return total


def _fold_group(
    group: BatchGroup, dataset: Dataset, layer: BatchNorm, channel: int, batch_size: int, recorder: _Recorder
) -> Moments:
    """The moments of one group of small batches, each folded into the layer's EMA in order, as
    `_statistics_pass` does batch by batch; the group's batches are summed in one compiled call where
    numba is installed (`per_batch_moments`), else batch by batch."""
    sums = per_batch_moments(group.data, channel, batch_size)
    if sums is None:
        parts = [_moments(batch, channel, dataset.path) for batch in group.batches]
        counts = np.array([p.count for p in parts], dtype=np.float64)
        means = np.stack([p.mean for p in parts])
        m2s = np.stack([p.m2 for p in parts])
    else:
        counts, means, m2s = sums
        bad = ~(np.all(np.isfinite(means), axis=1) & np.all(np.isfinite(m2s), axis=1))
        if np.any(bad):  # the first bad batch's own moments raise the DataError that names its samples
            _moments(group.batches[int(np.argmax(bad))], channel, dataset.path)
    merged = merge_rows(counts, means, m2s)
    # A batch with one value per channel has no variance to fold into the EMA (the update needs >= 2).
    usable = counts >= 2
    if np.any(usable):
        samples = np.array([len(batch.indices) for batch in group.batches], dtype=np.int64)[usable]
        before, seen = layer.batches_seen, layer.samples_seen
        stored_means, stored_vars = layer.fold_batches(
            means[usable],
            m2s[usable] / counts[usable, None],
            counts[usable].astype(np.int64),
            samples,
            compiled=sums is not None,  # numba is loaded already: fold in it too
        )
        recorder.record_folded(before, seen + np.cumsum(samples), stored_means, stored_vars)
    return merged


@dataclass
class _HeadState:
    weight: NDArray[Any]
    bias: NDArray[Any]
    loss: LossName


def _train_pass(
    dataset: Dataset,
    layer: BatchNorm,
    head: _HeadState,
    targets: NDArray[Any],
    optimizer: SGD | Adam,
    channel: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    recorder: _Recorder,
    bar: tqdm[Any],
) -> None:
    """One epoch of joint training of gamma, beta and the head over shuffled batches (BN in training mode)."""
    for batch in dataset.batches(batch_size, shuffle=True, seed=seed, epoch=epoch):
        bar.update(len(batch.indices))
        if _values_per_channel(batch, layer.num_channels) < 2:
            continue  # training normalizes by the batch variance, which one value per channel lacks
        x = batch.data.astype(layer.dtype, copy=False)
        try:
            y = layer.forward(x, training=True)
        except InvalidInputError as exc:
            raise DataError(f"{describe_nonfinite(batch, dataset.path)}: {exc}") from exc
        pooled = pool(y, channel)
        logits = linear(pooled, head.weight, head.bias)
        _, grad_logits = loss_and_grad(head.loss, logits, targets[batch.indices])
        grad_pooled, grad_weight, grad_bias = linear_backward(grad_logits, pooled, head.weight)
        layer.backward(pool_backward(grad_pooled, y.shape, channel))
        grad_gamma, grad_beta = layer.grad_gamma, layer.grad_beta
        if grad_gamma is None or grad_beta is None:
            raise InvalidInputError("the layer's backward pass did not produce parameter gradients")
        optimizer.step(
            [layer.gamma, layer.beta, head.weight, head.bias], [grad_gamma, grad_beta, grad_weight, grad_bias]
        )
        recorder.record(layer)


def _evaluate(
    dataset: Dataset, layer: BatchNorm, head: _HeadState, targets: NDArray[Any], channel: int, batch_size: int
) -> dict[str, float]:
    """Mean loss (and accuracy for cross-entropy) of the frozen layer and head over the training data."""
    loss_sum = 0.0
    correct = 0
    for batch in dataset.batches(batch_size):
        y = layer.forward(batch.data.astype(layer.dtype, copy=False), training=False)
        logits = linear(pool(y, channel), head.weight, head.bias)
        wanted = targets[batch.indices]
        loss, _ = loss_and_grad(head.loss, logits, wanted)
        loss_sum += loss * len(batch.indices)
        if head.loss == "cross-entropy":
            correct += int(np.count_nonzero(logits.argmax(axis=1) == wanted))
    result = {"train_loss": loss_sum / dataset.num_samples}
    if head.loss == "cross-entropy":
        result["train_accuracy"] = correct / dataset.num_samples
    return result


def fit(
    dataset: Dataset | str | os.PathLike[str],
    *,
    batch_size: int = 256,
    epochs: int = 1,
    momentum: float | None = 0.9,
    eps: float = 1e-5,
    axis: int = 1,
    stats: StatsKind = "ema",
    seed: int = 0,
    unbiased_moving_var: bool = False,
    targets: NDArray[Any] | str | os.PathLike[str] | None = None,
    head: Literal["linear"] | None = None,
    loss: LossName = "cross-entropy",
    lr: float = DEFAULT_LR,
    optimizer: OptimizerName = "adam",
    progress: bool = False,
) -> Checkpoint:
    """Fit BatchNorm on `dataset` (`(N, *sample_shape)`, channels at `axis`) and return the checkpoint.

    See the module docstring for the two kinds of statistics and the optional head. `momentum` weighs the
    past (ONNX/Keras); None is a cumulative average. `unbiased_moving_var` folds `var·m/(m-1)` into the
    moving variance (PyTorch) and makes the population variance `m2/(count-1)`. `targets` (a path or an
    array of N values) and `head="linear"` go together; `loss` is "cross-entropy" (integer class labels,
    K = max label + 1 classes) or "mse" (float targets `(N,)` or `(N, K)`), trained with `optimizer`
    ("sgd" or "adam") at learning rate `lr`. Parameters are float64 for float64 data, float32 otherwise.
    """
    _check_options(batch_size, epochs, stats, head, loss, optimizer, eps)
    data = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    if (targets is None) != (head is None):
        raise InvalidInputError("targets and a head go together: give both (to train a head) or neither")
    rank = len(data.sample_shape) + 1
    channel = normalize_axis(axis, rank)
    channels = data.sample_shape[channel - 1]
    if unbiased_moving_var and data.num_samples * data.sample_bytes // data.dtype.itemsize // channels < 2:
        raise InvalidInputError("an unbiased variance needs at least two values per channel")
    layer = BatchNorm(
        channels,
        momentum=momentum,
        eps=eps,
        axis=channel,
        dtype=_layer_dtype(data),
        unbiased_moving_var=unbiased_moving_var,
    )
    rng = np.random.default_rng(seed)
    batches_per_epoch = math.ceil(data.num_samples / batch_size)
    training = head is not None
    # Population statistics without training are order-free: one pass whatever `epochs` says.
    passes = epochs if training or stats == "ema" else 1
    recorder = _Recorder(every=max(1, math.ceil(passes * batches_per_epoch / MAX_TRAJECTORY_POINTS)))
    extras: dict[str, Any] = {"epochs": passes, "batch_size": batch_size, "seed": seed}
    head_state: _HeadState | None = None
    labels: NDArray[Any] = np.empty(0)
    population: Moments | None = None
    with progress_bar(progress, passes * data.num_samples, "fit") as bar:
        if targets is not None:
            labels, head_state = _prepare_head(data, targets, loss, channels, layer.dtype, rng)
            opt = make_optimizer(optimizer, lr)
            for epoch in range(epochs):
                _train_pass(
                    data, layer, head_state, labels, opt, channel, batch_size,
                    seed=seed, epoch=epoch, recorder=recorder, bar=bar,
                )  # fmt: skip
            extras.update({"head": "linear", "loss": loss, "optimizer": optimizer, "lr": lr})
            if stats == "population":
                population = _population(data, channel, channels, batch_size)
        else:
            for epoch in range(passes):
                population = _statistics_pass(
                    data, layer, channel, batch_size,
                    shuffle=stats == "ema", seed=seed, epoch=epoch, recorder=recorder, bar=bar,
                )  # fmt: skip
    recorder.record(layer, final=True)
    reads = passes + (1 if training and stats == "population" else 0)
    if stats == "population" and population is not None:
        ddof = 1 if unbiased_moving_var else 0
        layer.set_parameters(moving_mean=population.mean, moving_var=population.variance(ddof))
        extras["population_count"] = population.count
    if head_state is not None:
        extras.update(_evaluate(data, layer, head_state, labels, channel, batch_size))
        reads += 1
    extras["bytes_read"] = reads * data.nbytes
    return layer.to_checkpoint(
        sample_shape=data.sample_shape,
        stats=stats,
        data_fingerprint=data.fingerprint(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        version=bn_export.__version__,
        head=None if head_state is None else LinearHead(head_state.weight, head_state.bias, head_state.loss),
        trajectory=recorder.trajectory(),
        extras=extras,
    )


def _population(data: Dataset, channel: int, channels: int, batch_size: int) -> Moments:
    """Exact population `Moments` in one sequential pass (memory-mapped batches are views, no copies)."""
    total = Moments.empty(channels)
    for batch in _read_ahead(data.batches(batch_size), data, batch_size):
        total = total.merge(_moments(batch, channel, data.path))
    return total


def _prepare_head(
    data: Dataset,
    targets: NDArray[Any] | str | os.PathLike[str],
    loss: LossName,
    channels: int,
    dtype: np.dtype[Any],
    rng: np.random.Generator,
) -> tuple[NDArray[Any], _HeadState]:
    """Read and check the targets for `loss`, and initialise the head's weights from `rng`."""
    if isinstance(targets, np.ndarray):
        values, where = targets, "targets"
        if len(values) != data.num_samples:
            raise DataError(f"{len(values)} targets for {data.num_samples} data samples; expected one each")
        if values.dtype.kind not in "iuf" or values.ndim not in (1, 2):
            raise DataError(
                f"targets must be numbers of shape (N,) or (N, K), got {values.dtype} {values.shape}"
            )
    else:
        values, where = load_targets(targets, data.num_samples), os.fspath(targets)
    if loss == "cross-entropy":
        values = _check_labels(values, where)
        outputs = int(values.max()) + 1
    else:
        values = values.astype(dtype)
        outputs = 1 if values.ndim == 1 else int(values.shape[1])
    weight, bias = init_linear(channels, outputs, rng, dtype)
    return values, _HeadState(weight, bias, loss)
