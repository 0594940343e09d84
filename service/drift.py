"""Live input drift: the served inputs' per-channel statistics against the frozen moving statistics.

A frozen BatchNorm normalizes with statistics fixed at export time; when the inputs it serves stop looking
like the data those statistics came from, its outputs drift silently. `DriftMonitor` keeps streaming
per-channel moments of what it serves (`Moments`: exact, O(C) memory, mergeable across workers) and
compares them, per channel c, with the frozen `moving_mean`, `moving_var` and the layer's `eps`:

    d_c = (mean_live_c - moving_mean_c) / sqrt(moving_var_c + eps)       standardized mean shift
    r_c = (var_live_c + eps) / (moving_var_c + eps)                      variance ratio

`eps` is added to both variances because it is what the layer divides by, and it keeps channels that are
constant in the data (moving_var = 0, as in the digits' border pixels) finite: r = 1 while they stay constant.
`var_live` is the biased (population) variance, like `moving_var`.

The score is the symmetric KL divergence (Jeffreys) between the two per-channel Gaussians
N(mean_live, var_live + eps) and N(moving_mean, moving_var + eps), averaged over channels:

    J_c = KL(live || frozen) + KL(frozen || live) = (r_c + 1/r_c - 2)/2 + d_c² (1 + 1/r_c)/2
    score = mean_c J_c

It is 0 without drift, and reads in familiar units: a shift of half a standard deviation in every channel
(d = 0.5, r = 1) or a doubled or halved variance in every channel (r = 2 or 1/2, d = 0) both give 0.25,
the default threshold. The snapshot also reports max_c |d_c| and max_c |log r_c| to find one bad channel
among many good ones.

The live moments come from `bn_export.moments.shifted_moments`: float64 sums of `x - k` and `(x - k)²` per
channel, with `k` the frozen moving mean on the data's grid, in cache-sized chunks, without BLAS, whose
threads spin after each call and whose time the drift worker's own CPU clock would not see (the cost
against `Moments.from_batch` is in benchmarks/README.md, "Serving costs"). It stays exact to float64 rounding:
served data sit near the moving mean, and a batch that does not (its `Σ(x-k)² > 64·M2`) is summed again
about its own mean.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bn_export.errors import InvalidInputError
from bn_export.moments import Moments, shifted_moments

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.25
DEFAULT_MIN_SAMPLES = 100
# The share of one core the server's drift work may take (`BN_SERVE_DRIFT_MAX_FRACTION`); what it covers is
# measured in benchmarks/README.md, "Serving costs".
DEFAULT_MAX_CPU_FRACTION = 0.05


def drift_figures(
    live_mean: NDArray[np.float64],
    live_var: NDArray[np.float64],
    moving_mean: NDArray[np.float64],
    moving_var: NDArray[np.float64],
    eps: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel mean shift d, variance ratio r and Jeffreys divergence J, all (C,) (formulas above)."""
    frozen_var = moving_var + eps
    shift = (live_mean - moving_mean) / np.sqrt(frozen_var)
    ratio = (live_var + eps) / frozen_var
    jeffreys = 0.5 * (ratio + 1.0 / ratio - 2.0) + 0.5 * shift**2 * (1.0 + 1.0 / ratio)
    return shift, ratio, jeffreys


@dataclass(frozen=True)
class DriftSnapshot:
    """The monitor's figures at one moment. Per-channel arrays are (C,); all are None before any sample.

    `samples` counts the served samples (batch rows) behind the live statistics, `values` the values per
    channel (samples × spatial positions). `alerting` is True while the score is above `threshold`.
    """

    samples: int
    values: int
    threshold: float
    alerting: bool
    skipped_batches: int
    score: float | None = None
    max_abs_mean_shift: float | None = None
    max_abs_log_var_ratio: float | None = None
    worst_channel: int | None = None
    live_mean: NDArray[np.float64] | None = None
    live_var: NDArray[np.float64] | None = None
    mean_shift: NDArray[np.float64] | None = None
    var_ratio: NDArray[np.float64] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists of floats for the per-channel figures), e.g. for a stats route."""

        def listed(values: NDArray[np.float64] | None) -> list[float] | None:
            return None if values is None else [float(v) for v in values]

        return {
            "samples": self.samples,
            "values": self.values,
            "threshold": self.threshold,
            "alerting": self.alerting,
            "skipped_batches": self.skipped_batches,
            "score": self.score,
            "max_abs_mean_shift": self.max_abs_mean_shift,
            "max_abs_log_var_ratio": self.max_abs_log_var_ratio,
            "worst_channel": self.worst_channel,
            "channels": {
                "live_mean": listed(self.live_mean),
                "live_var": listed(self.live_var),
                "mean_shift": listed(self.mean_shift),
                "var_ratio": listed(self.var_ratio),
            },
        }


class DriftMonitor:
    """Streaming drift of one model's inputs against its frozen statistics; safe to update from any thread.

    `update(x)` takes a batch `x: (N, ..., C at axis, ...)` as served (any float dtype) and costs one pass
    over it outside the lock plus O(C) under it. Batches holding NaN or ±Inf are skipped and counted
    (the server refuses them by default; this covers its `allow_non_finite` setting).

    `window`: None keeps every sample since the monitor was built (or `reset`); an integer W keeps the
    recent traffic only -- two blocks of W samples, the full previous one and the filling current one, so
    the figures cover between W and 2W of the latest samples and old traffic cannot mask new drift.

    The score is compared with `threshold` once at least `min_samples` samples stand behind it: crossing
    it logs one warning, falling back to or below it logs one info line, and a later crossing warns again
    (unless `log_events` is False: a layer of a network, whose model logs for all its layers).
    """

    def __init__(
        self,
        moving_mean: ArrayLike,
        moving_var: ArrayLike,
        eps: float,
        *,
        axis: int = 1,
        name: str = "model",
        threshold: float = DEFAULT_THRESHOLD,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        window: int | None = None,
        log_events: bool = True,
    ) -> None:
        mean = np.asarray(moving_mean, dtype=np.float64)
        var = np.asarray(moving_var, dtype=np.float64)
        if mean.ndim != 1 or mean.shape != var.shape or mean.size == 0:
            raise InvalidInputError(
                f"moving_mean and moving_var must share one (C,) shape with C >= 1, "
                f"got {mean.shape} and {var.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
            raise InvalidInputError("moving_mean must be finite and moving_var finite and >= 0")
        if not (math.isfinite(eps) and eps > 0):
            raise InvalidInputError(f"eps must be finite and > 0 (the layer's epsilon), got {eps}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise InvalidInputError(f"threshold must be finite and > 0, got {threshold}")
        if min_samples < 1:
            raise InvalidInputError(f"min_samples must be >= 1, got {min_samples}")
        if window is not None and window < 1:
            raise InvalidInputError(f"window must be None or >= 1 samples, got {window}")
        if axis < 1:
            raise InvalidInputError(f"axis is the channel axis of a batch (batch axis 0), got {axis}")
        self.name = name
        self.moving_mean = mean
        self.moving_var = var
        self.eps = float(eps)
        self.axis = axis
        self.threshold = float(threshold)
        self.min_samples = min_samples
        self.window = window
        # Off for the monitors of a network's layers, whose model logs one alert for all of them.
        self.log_events = log_events
        self._lock = threading.Lock()
        self._reset_locked()

    @property
    def num_channels(self) -> int:
        return int(self.moving_mean.shape[0])

    def _reset_locked(self) -> None:
        empty = Moments.empty(self.num_channels)
        self._previous, self._previous_samples = empty, 0
        self._current, self._current_samples = empty, 0
        self._skipped = 0
        self._alerting = False

    def reset(self) -> None:
        """Forget every served sample (e.g. after the model was reloaded or the upstream data fixed)."""
        with self._lock:
            self._reset_locked()

    def moments_of(self, x: ArrayLike) -> Moments | None:
        """The moments of one batch `x: (N, ..., C at axis, ...)`, or None when it holds NaN/±Inf or its
        float64 sums overflow (such a batch says nothing about drift and would poison every later figure).
        Raises `InvalidInputError` for the wrong channel count or non-numbers. Takes no lock."""
        batch = np.asarray(x)
        if batch.ndim <= self.axis or batch.shape[self.axis] != self.num_channels:
            raise InvalidInputError(
                f"{self.name}: expected a batch with {self.num_channels} channels on axis {self.axis}, "
                f"got shape {batch.shape}"
            )
        if batch.dtype.kind not in "fiu":
            raise InvalidInputError(f"{self.name}: expected real numbers, got dtype {batch.dtype}")
        return shifted_moments(batch, self.axis, self.moving_mean)

    def update(self, x: ArrayLike) -> DriftSnapshot:
        """Add one served batch `x: (N, ..., C at axis, ...)` to the live statistics; return the figures."""
        batch = np.asarray(x)
        moments = self.moments_of(batch)
        if moments is None:
            return self.add(Moments.empty(self.num_channels), 0, skipped_batches=1)
        return self.add(moments, int(batch.shape[0]))

    def add(self, moments: Moments, samples: int, *, skipped_batches: int = 0) -> DriftSnapshot:
        """Merge `moments` of `samples` served samples (from `moments_of`, possibly several batches merged)
        and count `skipped_batches` left out for NaN/±Inf; check the threshold; return the figures."""
        if moments.num_channels != self.num_channels:
            raise InvalidInputError(
                f"{self.name}: expected moments of {self.num_channels} channels, got {moments.num_channels}"
            )
        if samples == 0 and skipped_batches == 0:
            return self.snapshot()
        with self._lock:
            self._skipped += skipped_batches
            if samples:
                self._current = self._current.merge(moments)
                self._current_samples += samples
                if self.window is not None and self._current_samples >= self.window:
                    self._previous, self._previous_samples = self._current, self._current_samples
                    self._current, self._current_samples = Moments.empty(self.num_channels), 0
            snapshot, event = self._snapshot_locked(check=samples > 0)
        if not self.log_events:
            return snapshot
        if event == "crossed":
            logger.warning(
                "input drift on %s: score %.4g above threshold %.4g over %d samples "
                "(worst channel %s: mean shift %.3g std, |log var ratio| %.3g)",
                self.name,
                snapshot.score,
                self.threshold,
                snapshot.samples,
                snapshot.worst_channel,
                snapshot.max_abs_mean_shift,
                snapshot.max_abs_log_var_ratio,
            )
        elif event == "recovered":
            logger.info(
                "input drift on %s recovered: score %.4g at or below threshold %.4g",
                self.name,
                snapshot.score,
                self.threshold,
            )
        return snapshot

    def snapshot(self) -> DriftSnapshot:
        """The current figures, without adding anything."""
        with self._lock:
            return self._snapshot_locked(check=False)[0]

    def _snapshot_locked(self, *, check: bool) -> tuple[DriftSnapshot, str | None]:
        live = self._previous.merge(self._current) if self._previous_samples else self._current
        samples = self._previous_samples + self._current_samples
        if live.count == 0:
            snapshot = DriftSnapshot(samples, 0, self.threshold, self._alerting, self._skipped)
            return snapshot, None
        live_mean = np.asarray(live.mean, dtype=np.float64)
        live_var = np.asarray(live.variance(), dtype=np.float64)
        shift, ratio, jeffreys = drift_figures(
            live_mean, live_var, self.moving_mean, self.moving_var, self.eps
        )
        score = float(jeffreys.mean())
        event = None
        if check and samples >= self.min_samples:
            if score > self.threshold and not self._alerting:
                self._alerting, event = True, "crossed"
            elif score <= self.threshold and self._alerting:
                self._alerting, event = False, "recovered"
        snapshot = DriftSnapshot(
            samples=samples,
            values=int(live.count),
            threshold=self.threshold,
            alerting=self._alerting,
            skipped_batches=self._skipped,
            score=score,
            max_abs_mean_shift=float(np.abs(shift).max()),
            max_abs_log_var_ratio=float(np.abs(np.log(ratio)).max()),
            worst_channel=int(jeffreys.argmax()),
            live_mean=live_mean,
            live_var=live_var,
            mean_shift=shift,
            var_ratio=ratio,
        )
        return snapshot, event
