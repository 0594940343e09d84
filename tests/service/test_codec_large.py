"""Large JSON bodies: decoded at most `MAX_LARGE_JSON_DECODES` at a time, each exactly as a small one is."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import numpy as np
import orjson
import pytest

from service import codec
from service.errors import InvalidInput


def large_body(values: int) -> bytes:
    x = np.random.default_rng(0).standard_normal(values).astype(np.float32)
    document = {"inputs": [{"name": "x", "shape": [values], "datatype": "FP32", "data": x.tolist()}]}
    body = orjson.dumps(document)
    assert len(body) > codec.LARGE_JSON_BYTES
    return body


def test_large_json_decodes_wait_for_a_place_and_then_decode_like_any_body() -> None:
    body = large_body(100_000)
    done = threading.Event()
    decoded: list[np.ndarray] = []

    def decode() -> None:
        decoded.append(codec.decode_request(body)[0].inputs[0][1])
        done.set()

    with ExitStack() as places:  # every place taken, as by other large decodes in flight
        for _ in range(codec.MAX_LARGE_JSON_DECODES):
            places.enter_context(codec._large_json_decodes())
        worker = threading.Thread(target=decode, daemon=True)
        worker.start()
        assert not done.wait(0.3)
        # A small body does not queue behind them.
        small = codec.decode_request(b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1.5]}]}')
        assert small[0].inputs[0][1].tolist() == [1.5]
    assert done.wait(30)
    worker.join()
    expected = np.asarray(orjson.loads(body)["inputs"][0]["data"]).astype(np.float32)
    np.testing.assert_array_equal(decoded[0], expected)


def test_a_malformed_large_body_is_refused_and_gives_its_place_back() -> None:
    body = large_body(100_000)
    for _ in range(codec.MAX_LARGE_JSON_DECODES + 1):
        with pytest.raises(InvalidInput, match="not valid JSON"):
            codec.decode_request(body[:-2])
    # Were a place kept by a refused body, this decode would wait forever: it runs on a thread with a limit.
    shapes: list[tuple[int, ...]] = []

    def decode() -> None:
        shapes.append(codec.decode_request(body)[0].inputs[0][1].shape)

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(30)
    assert shapes == [(100_000,)]
