"""Server settings: every field from the command line or from `BN_SERVE_<FIELD>` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.drift import DEFAULT_MAX_CPU_FRACTION, DEFAULT_THRESHOLD
from service.memory import TRIM_AFTER_JSON_BYTES
from service.observability import DEFAULT_ROWS_INTERVAL_S, DEFAULT_WORKER_NICE

Device = Literal["auto", "cpu", "cuda"]


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """How `bn-serve` runs. Exactly one of `model_repository` and `model` is required.

    `model_repository` is laid out as Triton's, `DIR/<name>/<version>/model.onnx` with integer versions;
    `model` serves one file under the name of its stem, as version 1.
    """

    model_config = SettingsConfigDict(env_prefix="BN_SERVE_", extra="forbid", frozen=True)

    model_repository: Path | None = None
    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="port of the gRPC inference service on host; 0 turns it off"
    )
    device: Device = "auto"
    workers: int = Field(default=1, ge=1)
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="onnxruntime threads per run; default cores // workers, at least 1"
    )
    inference_threads: int | None = Field(
        default=None, ge=1, description="runs in flight per process; default cores // workers, at least 1"
    )
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    trim_after_json_bytes: int = Field(
        default=TRIM_AFTER_JSON_BYTES,
        ge=0,
        description="a JSON body at least this large hands its freed memory back to the OS once decoded "
        "(lower resident memory; the next such request faults its pages in again); 0: only the periodic "
        "trim, once a second",
    )
    allow_non_finite: bool = False
    warmup: bool = True
    verify_budget_s: float = Field(
        default=20.0,
        gt=0,
        description="seconds the empirical frozen-statistics checks may take per model at load "
        "(bn-export verify --budget)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_flush_interval_s: float = Field(
        default=0.05,
        ge=0,
        description="access records are written out together at most this long after they are made "
        "(a crash loses at most that much of them); 0 writes each at once",
    )
    graceful_shutdown_s: float = Field(default=30.0, gt=0)
    direct_infer: bool = Field(
        default=True,
        description="answer small JSON infer requests from the HTTP protocol itself, merged per turn of "
        "the event loop (service.direct_infer); false sends every request through the ASGI app",
    )
    # On by default: with no delay it never holds a request back, and merged runs measured no slower (see
    # benchmarks/README.md, "Serving"); every model served passes the batch-invariance check at load.
    max_batch_size: int = Field(
        default=64, ge=1, description="samples merged into one run from concurrent requests; 1 is off"
    )
    max_batch_delay_us: int = Field(
        default=0, ge=0, description="longest wait for a batch to fill once requests queue; 0 never waits"
    )
    max_request_elements: int = Field(
        default=16 * 1024 * 1024, ge=1, description="tensor elements per request, all inputs together"
    )
    # The default lets one run hold what one request may; lower it to bound a merged run's memory below that.
    max_batch_elements: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="tensor elements of the inputs merged into one run; requests beyond it wait for the next",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="from the request's arrival to its answer; 504 beyond"
    )
    max_queued_requests: int = Field(
        default=128, ge=0, description="requests waiting for an inference slot; 503 + Retry-After beyond"
    )
    max_uploading_requests: int = Field(
        default=512,
        ge=1,
        description="requests whose body is still arriving (they hold no inference place); 503 beyond",
    )
    max_pending_response_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="response bytes encoded and not yet taken by slow clients, all together; 503 beyond",
    )
    send_timeout_s: float = Field(
        default=30.0, gt=0, description="longest a client may leave its response unread; closed beyond"
    )
    follow_symlinks: bool = Field(
        default=False, description="read repository files whose symbolic links lead outside the repository"
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="request line and headers together; 431 beyond, unread"
    )
    max_header_count: int = Field(default=100, ge=1, description="headers per request; 431 beyond")
    # Secrets come from the environment or a file only: a command-line flag would show in `ps`.
    api_key: str | None = Field(default=None, repr=False)
    api_keys_file: Path | None = None

    drift: bool = Field(
        default=True, description="track how far the served inputs drift from each model's frozen statistics"
    )
    drift_threshold: float = Field(
        default=DEFAULT_THRESHOLD, gt=0, description="drift score above which a warning is logged"
    )
    drift_window: int | None = Field(
        default=100_000, ge=1, description="recent samples behind the drift figures (between W and 2W)"
    )
    drift_update_interval_s: float = Field(
        default=DEFAULT_ROWS_INTERVAL_S,
        gt=0,
        description="how often small requests' drift figures are brought up to date (and alerts logged) "
        "when nothing reads them; a scrape or a stats request always counts every answered request",
    )
    drift_max_fraction: float = Field(
        default=DEFAULT_MAX_CPU_FRACTION,
        gt=0,
        description="share of one core the drift figures may take; whole requests beyond it are skipped",
    )
    drift_worker_nice: int = Field(
        default=DEFAULT_WORKER_NICE,
        ge=0,
        le=19,
        description="added to the process's nice value for the drift worker's thread (Linux): its work runs "
        "in the time requests leave free; 0 keeps the process's priority",
    )

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if (self.model_repository is None) == (self.model is None):
            raise ValueError("give exactly one of model_repository (a directory) and model (one .onnx file)")
        return self

    def resolved_intra_op_threads(self) -> int:
        """onnxruntime's intra-op threads: as set, or the cores shared out between workers (>= 1)."""
        return self.intra_op_threads or max(1, available_cores() // self.workers)

    def resolved_inference_threads(self) -> int:
        """Size of the pool that runs inference off the event loop: as set, or cores // workers (>= 1)."""
        return self.inference_threads or max(1, available_cores() // self.workers)
