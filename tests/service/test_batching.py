"""Adaptive batching: merged runs answer every request bit for bit as a run alone, and errors stay put."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from service.batching import PROBE_EVERY, Batcher, BatchPolicy, model_directory, read_policy
from service.errors import InvalidInput, ModelLoadError
from service.inference import InferenceCore, InferRequest, InferResponse
from service.model import LoadedModel
from service.repository import ModelRepository, ModelState, ModelVersion
from service.runtime import CPU, Session
from tests.service.conftest import (
    EPS,
    IR_VERSION,
    OPSET,
    binary_infer_body,
    binary_outputs,
    frozen_params,
    start_server,
    stop_server,
)

MERGING = BatchPolicy(max_batch_size=64, max_batch_delay_us=2_000)


@pytest.fixture(scope="module")
def core(repository: Any) -> InferenceCore:
    loaded = InferenceCore(ModelRepository.scan(repository.root), providers=[CPU], intra_op_threads=1)
    loaded.load_all()
    return loaded


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def request(x: NDArray[Any], outputs: list[str] | None = None) -> InferRequest:
    return InferRequest(id=None, inputs=[("input", x)], outputs=outputs)


def samples(seed: int, count: int) -> list[NDArray[np.float32]]:
    """`count` requests of 1 to 9 rows each, some rows far out of the training range."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((int(rng.integers(1, 10)), 4)).astype(np.float32) for _ in range(count)]
    batches[0][0] = np.float32(1e6)  # a wild companion must not move anyone else's output
    return batches


def serve_concurrently(batcher: Batcher, core: InferenceCore, requests: list[InferRequest]) -> list[Any]:
    """Every request submitted at once to `batcher`; its response, or the exception it raised, in order."""

    async def one(item: InferRequest) -> InferResponse:
        await asyncio.sleep(0)
        return await batcher.infer(core.prepare("frozen", "1", item))

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(one(r) for r in requests), return_exceptions=True))

    return asyncio.run(main())


def test_merged_runs_equal_runs_alone_bitwise(core: InferenceCore, executor: ThreadPoolExecutor) -> None:
    batches = samples(seed=1, count=40)
    # Above the inline limit too, so merged runs go through the thread pool as large requests do.
    for inline in (0, 1 << 20):
        batcher = Batcher(core, executor, MERGING, inline_max_elements=inline)
        responses = serve_concurrently(batcher, core, [request(x) for x in batches])
        assert batcher.runs < len(batches) / 4, "concurrent requests were not merged"
        for x, response in zip(batches, responses, strict=True):
            alone = dict(core.infer("frozen", "1", request(x)).outputs)
            merged = dict(response.outputs)
            for name in ("output", "logits"):
                assert merged[name].shape == alone[name].shape
                assert merged[name].tobytes() == alone[name].tobytes(), name


def test_without_a_delay_lone_requests_run_at_once_and_requests_together_still_merge(
    core: InferenceCore, executor: ThreadPoolExecutor
) -> None:
    batcher = Batcher(core, executor, BatchPolicy(max_batch_size=64, max_batch_delay_us=0))
    lone = samples(seed=7, count=3 * PROBE_EVERY)

    async def one_after_another() -> list[InferResponse]:
        return [await batcher.infer(core.prepare("frozen", "1", request(x))) for x in lone]

    answers = asyncio.run(one_after_another())
    # The first queues and finds no companion; then PROBE_EVERY run at once, one queues to look, and so on.
    assert batcher.runs == len(lone)
    assert batcher.direct_runs == len(lone) - 3
    together = samples(seed=8, count=40)
    responses = serve_concurrently(batcher, core, [request(x) for x in together])
    assert batcher.runs - len(lone) < len(together) / 4, "requests arriving together were not merged"
    for x, response in zip([*lone, *together], [*answers, *responses], strict=True):
        alone = dict(core.infer("frozen", "1", request(x)).outputs)
        for name, got in response.outputs:
            assert got.tobytes() == alone[name].tobytes(), name
    assert not batcher._held, "a request is still counted after its answer"


def test_a_request_claimed_to_run_alone_is_held_as_a_lone_run_and_merges_are_unchanged(
    core: InferenceCore, executor: ThreadPoolExecutor
) -> None:
    batcher = Batcher(core, executor, BatchPolicy(max_batch_size=64, max_batch_delay_us=0))
    model = core.model("frozen", "1").model
    assert model is not None
    xs = samples(seed=9, count=6)

    async def main() -> list[bool]:
        claims = []
        with batcher.running_alone(model) as alone:  # nothing has probed yet: it queues through `infer`
            claims.append(alone)
        await batcher.infer(core.prepare("frozen", "1", request(xs[0])))  # the probe: no companion
        with batcher.running_alone(model) as alone:
            claims.append(alone)
            # Meanwhile, it counts as running: a second claim is refused, and a request queues behind it.
            with batcher.running_alone(model) as second:
                claims.append(second)
            queued = asyncio.ensure_future(batcher.infer(core.prepare("frozen", "1", request(xs[1]))))
            await asyncio.sleep(0)
            assert not queued.done()
        await queued

        def refused() -> None:
            with batcher.running_alone(model) as alone:
                claims.append(alone)
                raise RuntimeError("refused before its run")

        with pytest.raises(RuntimeError):
            refused()
        return claims

    runs_before = batcher.runs
    assert asyncio.run(main()) == [False, True, False, True]
    # The probe, the claimed run, the queued one; the claim that raised made no run.
    assert batcher.runs - runs_before == 3
    assert batcher.direct_runs == 1
    assert not batcher._held
    off = Batcher(core, executor, BatchPolicy(max_batch_size=1, max_batch_delay_us=0))
    with off.running_alone(model) as alone:
        assert alone
    waiting = Batcher(core, executor, BatchPolicy(max_batch_size=64, max_batch_delay_us=500))
    with waiting.running_alone(model) as alone:
        assert not alone


def test_merged_output_equals_the_float64_formula(
    core: InferenceCore, executor: ThreadPoolExecutor, repository: Any
) -> None:
    batches = samples(seed=2, count=12)
    responses = serve_concurrently(Batcher(core, executor, MERGING), core, [request(x) for x in batches])
    for x, response in zip(batches, responses, strict=True):
        np.testing.assert_allclose(
            dict(response.outputs)["output"], repository.params[1].output(x), rtol=1e-6, atol=1e-5
        )


def test_requests_asking_for_different_outputs_get_their_own(
    core: InferenceCore, executor: ThreadPoolExecutor
) -> None:
    batches = samples(seed=3, count=12)
    asked = [["logits"] if i % 3 == 0 else ["output"] if i % 3 == 1 else None for i in range(len(batches))]
    batcher = Batcher(core, executor, MERGING)
    responses = serve_concurrently(
        batcher, core, [request(x, o) for x, o in zip(batches, asked, strict=True)]
    )
    for x, names, response in zip(batches, asked, responses, strict=True):
        alone = core.infer("frozen", "1", request(x, names))
        assert [n for n, _ in response.outputs] == [n for n, _ in alone.outputs]
        for (_, got), (_, want) in zip(response.outputs, alone.outputs, strict=True):
            assert got.tobytes() == want.tobytes()


def test_max_batch_size_bounds_every_run(core: InferenceCore, executor: ThreadPoolExecutor) -> None:
    rows = [np.full((3, 4), i, dtype=np.float32) for i in range(20)]  # 60 rows in all
    policy = BatchPolicy(max_batch_size=7, max_batch_delay_us=2_000)
    batcher = Batcher(core, executor, policy)
    responses = serve_concurrently(batcher, core, [request(x) for x in rows])
    # At most two 3-row requests fit in 7 rows: at least 10 runs for 20 requests.
    assert batcher.runs >= 10
    for x, response in zip(rows, responses, strict=True):
        assert (
            dict(response.outputs)["output"].tobytes()
            == dict(core.infer("frozen", "1", request(x)).outputs)["output"].tobytes()
        )


class RecordingCore(InferenceCore):
    """The real core, noting the input elements of every run it makes."""

    elements: list[int]

    def run(
        self,
        model: LoadedModel,
        output_names: list[str],
        feeds: dict[str, NDArray[Any]],
        requests: int = 1,
    ) -> list[NDArray[Any]]:
        self.elements.append(sum(a.size for a in feeds.values()))
        return super().run(model, output_names, feeds, requests)


def test_max_batch_elements_bounds_every_merged_run(repository: Any, executor: ThreadPoolExecutor) -> None:
    recording = RecordingCore(ModelRepository.scan(repository.root), providers=[CPU], intra_op_threads=1)
    recording.load_all()
    recording.elements = []
    batches = samples(seed=6, count=40)  # 1 to 9 rows of 4 channels: 4 to 36 elements each
    batches.append(np.ones((12, 4), np.float32))  # 48 elements: over the cap, runs alone
    limit = 40
    batcher = Batcher(core=recording, executor=executor, policy=MERGING, max_batch_elements=limit)
    responses = serve_concurrently(batcher, recording, [request(x) for x in batches])
    merged = [e for e in recording.elements if e <= limit]
    assert len(recording.elements) == batcher.runs < len(batches), "concurrent requests were not merged"
    assert max(merged) > 36, "no run merged more than one request"  # 36: the largest of the small ones
    assert sorted(set(recording.elements) - set(merged)) == [48]  # only the lone large request exceeds it
    for x, response in zip(batches, responses, strict=True):
        alone = dict(recording.infer("frozen", "1", request(x)).outputs)
        for name, got in response.outputs:
            assert got.tobytes() == alone[name].tobytes(), name


def test_a_lone_request_is_not_delayed(core: InferenceCore, executor: ThreadPoolExecutor) -> None:
    batcher = Batcher(core, executor, BatchPolicy(max_batch_size=64, max_batch_delay_us=2_000_000))
    started = time.perf_counter()
    serve_concurrently(batcher, core, [request(np.ones((1, 4), np.float32))])
    assert time.perf_counter() - started < 1.0  # the 2 s delay applies only once requests queue together


def test_invalid_requests_are_refused_before_they_join_a_batch(
    core: InferenceCore, executor: ThreadPoolExecutor
) -> None:
    with pytest.raises(InvalidInput, match="3 channels"):
        core.prepare("frozen", "1", request(np.ones((1, 3), np.float32)))
    bad = np.ones((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(InvalidInput, match="non-finite"):
        core.prepare("frozen", "1", request(bad))


def gather_model(path: Path) -> Session:
    """input (N, 4) -> frozen BatchNormalization -> output, and `picked = table[int(input)]` with a 10-entry
    table: a run fails (onnxruntime INVALID_ARGUMENT) when any input value is outside [-10, 9]."""
    params = frozen_params(5)
    inits = [numpy_helper.from_array(getattr(params, n), n) for n in ("gamma", "beta", "mean", "var")]
    inits.append(numpy_helper.from_array(np.arange(10, dtype=np.float32), "table"))
    nodes = [
        helper.make_node(
            "BatchNormalization", ["input", "gamma", "beta", "mean", "var"], ["output"], epsilon=EPS
        ),
        helper.make_node("Cast", ["input"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["N", 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return Session(path, [CPU], 1)


def test_a_failed_merged_run_fails_only_the_request_that_caused_it(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    # The graph fails for some inputs, so verification (which runs random inputs) would refuse it; it is put
    # in the repository as loaded on purpose, to make a merged run fail at run time.
    path = tmp_path / "gather" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    loaded = LoadedModel("gather", 1, gather_model(path), {}, MERGING, None, "not watched", ("gather", "1"))
    entry = ModelVersion("gather", 1, path, state=ModelState.READY, model=loaded)
    gather_core = InferenceCore(ModelRepository([entry]), providers=[CPU], intra_op_threads=1)
    inputs = [np.full((2, 4), i % 10, dtype=np.float32) for i in range(12)]
    inputs[5][1, 3] = np.float32(40.0)  # out of the table: this request's run fails, alone or merged
    batcher = Batcher(gather_core, executor, MERGING)

    async def main() -> list[Any]:
        async def one(x: NDArray[np.float32]) -> InferResponse:
            await asyncio.sleep(0)
            return await batcher.infer(gather_core.prepare("gather", None, request(x)))

        return list(await asyncio.gather(*(one(x) for x in inputs), return_exceptions=True))

    results = asyncio.run(main())
    for i, (x, result) in enumerate(zip(inputs, results, strict=True)):
        if i == 5:
            assert isinstance(result, InvalidInput)
            assert "out of data bounds" in str(result)
        else:
            assert isinstance(result, InferResponse), result
            np.testing.assert_array_equal(dict(result.outputs)["picked"], x)


def test_config_json_beside_the_versions_overrides_the_default(tmp_path: Path) -> None:
    default = BatchPolicy(max_batch_size=8, max_batch_delay_us=100)
    entry = ModelVersion("m", 3, tmp_path / "m" / "3" / "model.onnx")
    directory = model_directory(entry)
    assert directory == tmp_path / "m"
    assert read_policy(directory, default) == default  # no file: the server's policy
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"max_batch_size": 32}))
    assert read_policy(directory, default) == BatchPolicy(max_batch_size=32, max_batch_delay_us=100)
    (directory / "config.json").write_text(json.dumps({"max_batch_size": 1, "max_batch_delay_us": 0}))
    assert not read_policy(directory, default).enabled
    # A single model file has no model directory: nothing beside it is read as its configuration.
    assert model_directory(ModelVersion("m", 1, tmp_path / "m.onnx")) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"max_batch_sise": 4}', "keys among"),
        ('{"max_batch_size": 0}', "at least 1"),
        ('{"max_batch_size": "8"}', "integer"),
        ('{"max_batch_delay_us": -1}', "at least 0"),
        ("[8]", "JSON object"),
    ],
)
def test_a_bad_config_json_is_refused_with_its_reason(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=words):
        read_policy(tmp_path, BatchPolicy())


@pytest.mark.slow
def test_concurrent_clients_over_http_get_bitwise_the_outputs_of_runs_alone(repository: Any) -> None:
    """Many clients at once against a real bn-serve process with batching on; each response equals a run
    of that request alone in onnxruntime, bit for bit."""
    model = repository.root / "frozen" / "2" / "model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(model), options, providers=[CPU])
    server = start_server(
        "--model-repository",
        str(repository.root),
        "--device",
        "cpu",
        "--intra-op-threads",
        "1",
        env={"BN_SERVE_MAX_BATCH_SIZE": "32", "BN_SERVE_MAX_BATCH_DELAY_US": "1000"},
    )
    try:
        batches = samples(seed=4, count=96)

        def call(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
            body, header_length = binary_infer_body(x)
            response = httpx.post(
                f"{server.url}/v2/models/frozen/infer",
                content=body,
                headers={"Inference-Header-Content-Length": str(header_length)},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            outputs = binary_outputs(response)
            return outputs["output"], outputs["logits"].ravel()

        with concurrent.futures.ThreadPoolExecutor(24) as clients:
            answers = list(clients.map(call, batches))
        for x, (output, logits) in zip(batches, answers, strict=True):
            want_output, want_logits = reference.run(["output", "logits"], {"input": x})
            assert output.tobytes() == want_output.tobytes()
            assert logits.tobytes() == want_logits.tobytes()
    finally:
        assert stop_server(server) == 0


@pytest.mark.parametrize("max_batch_size", [64, 1 << 16])
def test_large_requests_run_alone_in_one_trip_answer_as_queued_ones(
    repository: Any, serve_in_process: Any, max_batch_size: int
) -> None:
    """Past the inline body size, a request the batcher would run alone is decoded, run and encoded in one
    trip to the pool (`InferRoute._prepare_large`): one that fills a run by itself (20,000 samples against
    64), or one of a lone run the batcher claims (against 65,536, once the first request probed through the
    queue). Its answers and refusals are those of the queued way, and its run is counted as any other."""
    server = serve_in_process(max_request_bytes=1 << 21, max_batch_size=max_batch_size)
    try:
        batcher = server.app.state.batcher
        rng = np.random.default_rng(11)
        x = rng.standard_normal((20_000, 4)).astype(np.float32)  # 320 KB: past the inline body size
        body, header_length = binary_infer_body(x)
        headers = {"Inference-Header-Content-Length": str(header_length)}
        pool = server.app.front.route._executor
        submit, trips = pool.submit, []

        def counted(*args: Any, **kwargs: Any) -> Any:
            trips.append(args[0])
            return submit(*args, **kwargs)

        answers = []
        for _ in range(4):
            pool.submit = counted
            try:
                response = server.post("/v2/models/frozen/versions/2/infer", content=body, headers=headers)
            finally:
                del pool.submit
            assert response.status_code == 200, response.text
            answers.append(binary_outputs(response))
        # The probe (65,536) queues after its trip and runs in a second; every other request takes one.
        assert len(trips) == (4 if max_batch_size == 64 else 5)
        assert batcher.runs == 4
        # Claimed lone runs: all but the probe.
        assert batcher.direct_runs == (0 if max_batch_size == 64 else 3)
        for answer in answers[1:]:
            for name, array in answer.items():
                assert array.tobytes() == answers[0][name].tobytes(), name
        np.testing.assert_allclose(answers[0]["output"], repository.params[2].output(x), rtol=1e-5, atol=1e-5)
        runs = batcher.runs
        bad = x.copy()
        bad[123, 2] = np.nan
        refused = server.post(
            "/v2/models/frozen/versions/2/infer", content=binary_infer_body(bad)[0], headers=headers
        )
        assert refused.status_code == 400
        assert "non-finite" in refused.json()["error"]
        assert "[123, 2]" in refused.json()["error"]
        assert batcher.runs == runs, "a refused request made a run"
        assert not batcher._held
    finally:
        server.close()
