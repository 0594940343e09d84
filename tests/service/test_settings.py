"""Settings come from BN_SERVE_* variables, flags win, and thread defaults share the cores between workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, available_cores


def test_environment_variables_set_every_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BN_SERVE_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("BN_SERVE_PORT", "9123")
    monkeypatch.setenv("BN_SERVE_MAX_REQUEST_BYTES", "1000")
    monkeypatch.setenv("BN_SERVE_ALLOW_NON_FINITE", "true")
    settings = Settings()
    assert (settings.model_repository, settings.port) == (tmp_path, 9123)
    assert settings.max_request_bytes == 1000
    assert settings.allow_non_finite is True
    assert Settings(port=8001).port == 8001  # an explicit value (a flag) wins over the environment


def test_exactly_one_model_source_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        Settings()
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(model_repository=tmp_path, model=tmp_path / "m.onnx")


def test_threads_default_to_the_cores_shared_between_workers(tmp_path: Path) -> None:
    cores = available_cores()
    settings = Settings(model=tmp_path / "m.onnx", workers=cores * 2)
    assert settings.resolved_intra_op_threads() == 1
    assert Settings(model=tmp_path / "m.onnx").resolved_intra_op_threads() == cores
    assert Settings(model=tmp_path / "m.onnx", intra_op_threads=3).resolved_intra_op_threads() == 3


def test_the_drift_workers_nice_increment_is_read_and_bounded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model = tmp_path / "m.onnx"
    assert Settings(model=model).drift_worker_nice == 0
    monkeypatch.setenv("BN_SERVE_DRIFT_WORKER_NICE", "19")
    assert Settings(model=model).drift_worker_nice == 19
    for refused in ("-1", "20", "low"):
        monkeypatch.setenv("BN_SERVE_DRIFT_WORKER_NICE", refused)
        with pytest.raises(ValidationError, match="drift_worker_nice"):
            Settings(model=model)
