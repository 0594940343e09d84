"""The transport-free core without HTTP: load, prepare, run, reload, unload and a refused reload, on a real
onnxruntime; what each does to the metrics and the drift figures; request ids in the logs of batched runs."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from service.batching import Batcher, BatchPolicy
from service.errors import InvalidInput, LoadRefused, ModelNotReady
from service.inference import InferenceCore, InferRequest
from service.lifecycle import ModelLifecycle
from service.log import JsonLinesHandler, request_id
from service.model import exact_policy
from service.observability import Observability
from service.repository import ModelRepository, ModelState
from service.runtime import CPU, TensorSpec
from tests.service.conftest import frozen_model, frozen_params

A, B = frozen_params(21), frozen_params(22)
DEFAULT = BatchPolicy(max_batch_size=8)


def write(root: Path, version: int, model: onnx.ModelProto | bytes) -> Path:
    path = root / "m" / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        onnx.save(model, path)
    return path


def rows(n: int, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


class Served:
    """A core over DIR/m/<version>, loaded, with its lifecycle and observability (every input summed)."""

    def __init__(self, root: Path, **observability: Any) -> None:
        self.root = root
        self.observability = Observability(max_cpu_fraction=1.0, **observability)
        self.core = InferenceCore(
            ModelRepository.scan(root),
            providers=[CPU],
            intra_op_threads=1,
            observability=self.observability,
            default_policy=DEFAULT,
        )
        self.core.load_all()
        self.lifecycle = ModelLifecycle(self.core)

    def output(self, x: NDArray[np.float32], version: str | None = None) -> NDArray[Any]:
        prepared = self.core.prepare("m", version, InferRequest("r", [("input", x)], ["output"]))
        (output,) = self.core.run(prepared.model, prepared.output_names, prepared.feeds)
        return output

    def metric(self, name: str, version: str = "1", **labels: str) -> float | None:
        self.observability.metrics.flush()
        value = self.observability.metrics.registry.get_sample_value(
            name, {"model": "m", "version": version, **labels}
        )
        return value

    def drift(self, version: str | None = None) -> dict[str, Any]:
        self.observability.flush()
        stats: dict[str, Any] = self.observability.drift_stats(self.core.model("m", version))
        return stats


@pytest.fixture
def served(tmp_path: Path) -> Served:
    write(tmp_path, 1, frozen_model(A))
    return Served(tmp_path)


def test_a_loaded_model_prepares_and_runs_to_the_formula(served: Served) -> None:
    x = rows(5)
    np.testing.assert_allclose(served.output(x), A.output(x), rtol=1e-5, atol=1e-5)
    entry = served.core.model("m")
    assert entry.state is ModelState.READY
    assert entry.model is not None
    assert entry.model.policy == DEFAULT  # no config.json: the server's policy
    assert served.core.unready_reason() is None
    assert served.metric("bn_serve_model_ready") == 1
    assert served.drift()["drift"]["samples"] == 5


def test_sessions_run_without_the_cpu_arena_that_would_keep_the_largest_runs_buffers(served: Served) -> None:
    entry = served.core.model("m")
    assert entry.model is not None
    options = entry.model.session._session.get_session_options()
    assert options.enable_cpu_mem_arena is False
    x = rows(3)
    np.testing.assert_allclose(served.output(x), A.output(x), rtol=1e-5, atol=1e-5)


def test_a_reload_swaps_every_version_at_once_and_prepared_requests_keep_theirs(served: Served) -> None:
    x = rows(3)
    before = served.core.prepare("m", None, InferRequest(None, [("input", x)], ["output"]))
    write(served.root, 1, frozen_model(B))
    write(served.root, 2, frozen_model(B))
    served.lifecycle.load("m")
    assert served.core.repository.versions("m") == [1, 2]
    np.testing.assert_allclose(served.output(x, "1"), B.output(x), rtol=1e-5, atol=1e-5)
    # Validated against the old load, the request runs on it.
    (old,) = served.core.run(before.model, before.output_names, before.feeds)
    np.testing.assert_allclose(old, A.output(x), rtol=1e-5, atol=1e-5)
    assert served.metric("bn_serve_model_ready", "1") == served.metric("bn_serve_model_ready", "2") == 1


def test_a_refused_reload_keeps_the_ready_gauge_and_the_drift_of_the_serving_version(served: Served) -> None:
    served.output(rows(10))
    assert served.drift()["drift"]["samples"] == 10
    path = served.root / "m" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(LoadRefused, match="keeps serving"):
        served.lifecycle.load("m")
    assert served.metric("bn_serve_model_ready") == 1
    assert served.metric("bn_serve_drift_samples") == 10
    served.output(rows(5, seed=1))  # drift of the serving version is still measured
    assert served.drift()["drift"]["samples"] == 15
    assert served.metric("bn_serve_drift_samples") == 15


def test_unload_refuses_requests_and_removes_the_model_series_until_loaded_again(served: Served) -> None:
    served.output(rows(4))
    served.drift()
    assert served.metric("bn_serve_drift_requests_total", outcome="covered") == 1
    served.lifecycle.unload("m")
    with pytest.raises(ModelNotReady, match="unloaded"):
        served.output(rows(1))
    for name in ("bn_serve_model_ready", "bn_serve_model_load_seconds", "bn_serve_drift_samples"):
        assert served.metric(name) is None, name
    assert served.metric("bn_serve_drift_requests_total", outcome="covered") is None
    assert served.drift()["drift"] is None
    served.lifecycle.load("m")
    assert served.metric("bn_serve_model_ready") == 1
    assert served.drift()["drift"]["samples"] == 0  # a fresh monitor


@pytest.mark.parametrize(
    ("text", "words"),
    [('{"max_batch_size": "lots"}', "must be an integer"), ("{not json", "not valid JSON")],
)
def test_a_bad_config_json_refuses_the_load_and_the_old_version_serves_on(
    served: Served, text: str, words: str
) -> None:
    (served.root / "m" / "config.json").write_text(text)
    with pytest.raises(LoadRefused, match=words) as refused:
        served.lifecycle.load("m")
    assert "m/config.json" in str(refused.value)
    assert str(served.root) not in str(refused.value)  # the reason names the file, not where it is
    x = rows(2)
    np.testing.assert_allclose(served.output(x), A.output(x), rtol=1e-5, atol=1e-5)
    assert served.metric("bn_serve_model_ready") == 1


def test_a_bad_config_json_at_start_leaves_the_model_unavailable_with_its_reason(tmp_path: Path) -> None:
    write(tmp_path, 1, frozen_model(A))
    (tmp_path / "m" / "config.json").write_text('{"max_batch_size": 0}')
    core = Served(tmp_path).core
    entry = core.model("m")
    assert entry.state is ModelState.UNAVAILABLE
    assert entry.reason is not None
    assert "config.json" in entry.reason
    with pytest.raises(ModelNotReady) as refused:
        core.prepare("m", None, InferRequest(None, [("input", rows(1))]))
    assert "model 'm' version 1 is not ready" in str(refused.value)
    assert str(tmp_path) not in str(refused.value)


def test_the_config_json_is_read_at_load_only(tmp_path: Path) -> None:
    write(tmp_path, 1, frozen_model(A))
    (tmp_path / "m" / "config.json").write_text('{"max_batch_size": 1}')
    served = Served(tmp_path)
    (tmp_path / "m" / "config.json").write_text('{"max_batch_size": "lots"}')  # not read until a load
    (tmp_path / "m" / "1" / "model.onnx").unlink()
    entry = served.core.model("m")
    assert entry.model is not None
    assert entry.model.policy == BatchPolicy(max_batch_size=1)
    x = rows(2)
    np.testing.assert_allclose(served.output(x), A.output(x), rtol=1e-5, atol=1e-5)


def test_a_model_that_fails_to_load_names_itself_never_its_path(tmp_path: Path) -> None:
    write(tmp_path, 1, b"not onnx")
    core = Served(tmp_path).core
    with pytest.raises(ModelNotReady) as refused:
        core.prepare("m", None, InferRequest(None, [("input", rows(1))]))
    assert "model 'm' version 1" in str(refused.value)
    assert str(tmp_path) not in str(refused.value)
    assert core.unready_reason() is not None


# -- request ids in batched runs ---------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The server's JSON log lines, formatted where each record is logged (its thread, its context)."""
    stream = io.StringIO()
    handler = JsonLinesHandler()
    handler.setStream(stream)
    logger = logging.getLogger("bn_serve")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def _drift_warnings(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if "the worker is behind" in line["message"]]


def _serve_with_ids(served: Served, ids: list[str], policy: BatchPolicy) -> None:
    """Each id's request through one Batcher at once, every run in the pool (where the drift queue, full,
    logs a warning from inside the run)."""
    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(served.core, executor, policy, inline_max_elements=0)

        async def one(rid: str) -> None:
            request_id.set(rid)  # what the front does for each request, in its own task
            prepared = served.core.prepare("m", None, InferRequest(rid, [("input", rows(2))]))
            await batcher.infer(prepared)

        async def main() -> None:
            await asyncio.gather(*(one(rid) for rid in ids))

        asyncio.run(main())
        assert batcher.runs == (1 if policy.enabled else len(ids))


def test_a_run_in_the_pool_logs_with_its_request_id(tmp_path: Path, json_log: io.StringIO) -> None:
    write(tmp_path, 1, frozen_model(A))
    served = Served(tmp_path, inline_values=0, max_pending_bytes=1)
    _serve_with_ids(served, ["solo"], BatchPolicy(max_batch_size=1))
    (warning,) = _drift_warnings(json_log)
    assert warning["request_id"] == "solo"
    assert "request_ids" not in warning


def test_a_merged_run_logs_with_the_ids_of_all_its_requests(tmp_path: Path, json_log: io.StringIO) -> None:
    write(tmp_path, 1, frozen_model(A))
    served = Served(tmp_path, inline_values=0, max_pending_bytes=1)
    _serve_with_ids(served, ["r0", "r1", "r2"], BatchPolicy(max_batch_size=64))
    (warning,) = _drift_warnings(json_log)
    assert warning["request_ids"] == ["r0", "r1", "r2"]
    assert warning["request_id"] == "r0"


def test_the_verify_budget_setting_sizes_the_checks_run_at_load(tmp_path: Path) -> None:
    write(tmp_path, 1, frozen_model(A))
    core = InferenceCore(
        ModelRepository.scan(tmp_path), providers=[CPU], intra_op_threads=1, verify_budget_s=1e-6
    )
    core.load_all()
    verification = core.metadata("m").parameters["verification"]
    invariance = next(c for c in verification["checks"] if c["name"] == "batch_invariance")
    assert invariance["passed"]
    assert "budget allowed 1 of" in invariance["detail"], invariance["detail"]


def _verification(figure: float | None) -> dict[str, Any]:
    return {"checks": [{"name": "batch_invariance", "passed": True, "figure": figure, "detail": ""}]}


def test_merging_stays_on_where_verify_found_every_output_bitwise() -> None:
    assert exact_policy(DEFAULT, _verification(0.0)) == (DEFAULT, None)


@pytest.mark.parametrize("figure", [1.2e-7, None])
def test_merging_is_turned_off_where_outputs_move_with_the_batch(figure: float | None) -> None:
    policy, note = exact_policy(DEFAULT, _verification(figure))
    assert policy == BatchPolicy(1, 0)
    assert note is not None
    assert "adaptive batching is off" in note


def test_metadata_shows_the_batching_policy_served(tmp_path: Path) -> None:
    write(tmp_path, 1, frozen_model(A))
    served = Served(tmp_path)
    batching = served.core.metadata("m").parameters["batching"]
    assert batching == {"max_batch_size": 8, "max_batch_delay_us": 0, "note": None}


dims = st.lists(st.integers(0, 3), max_size=3)


@given(spec=st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=3), shape=dims)
def test_an_input_is_accepted_exactly_when_its_rank_and_fixed_dimensions_match(
    spec: list[int | None], shape: list[int]
) -> None:
    # Any rank, any dimensions fixed or dynamic (the batch's alone takes a shortcut): the reference is the
    # rule itself, every fixed dimension equal and nothing else checked.
    core = InferenceCore(ModelRepository({}), providers=[CPU], intra_op_threads=1)
    tensor = TensorSpec("input", "FP32", tuple(spec))
    x = np.zeros(shape, dtype=np.float32)
    fits = len(shape) == len(spec) and all(w is None or g == w for g, w in zip(shape, spec, strict=False))
    if fits:
        assert core._validate(tensor, np.dtype(np.float32), x) is x
    else:
        with pytest.raises(InvalidInput, match=r"rank|on axis"):
            core._validate(tensor, np.dtype(np.float32), x)
