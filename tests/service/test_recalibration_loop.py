"""The recalibration loop end to end, on a real bn-serve process serving the fixture MLP (two BatchNorm1d
layers): the traffic shifts, the drift at the layers the shift reaches alerts (those an independent
reference computes: onnx's reference evaluator on the same samples), `bn-export recalibrate` on the recent
traffic, `bn-export verify`, the result copied in as version 2, `POST /v2/repository/models/mlp/load`
while a client keeps sending (no request fails), and the drift is back to normal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from numpy.typing import NDArray
from onnx.reference import ReferenceEvaluator

from bn_export.graph_surgery import find_batchnorm_layers
from service.drift import DEFAULT_THRESHOLD, drift_figures
from tests.fixtures.make_networks import OUT
from tests.service.conftest import start_server, stop_server

BATCH = 8


def bn_export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bn_export.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def send(client: httpx.Client, x: NDArray[np.float32]) -> int:
    body = {
        "inputs": [
            {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    return client.post("/v2/models/mlp/infer", json=body).status_code


def serve_all(client: httpx.Client, data: NDArray[np.float32]) -> None:
    for start in range(0, len(data), BATCH):
        assert send(client, data[start : start + BATCH]) == 200


def reference_scores(path: Path, x: NDArray[np.float32]) -> dict[str, float]:
    """Each layer's drift score for samples `x`, from onnx's reference evaluator and the formulas."""
    model = onnx.load(path)
    values: dict[str, Any] = ReferenceEvaluator(model).run(None, {"features": x}, intermediate=True)  # type: ignore[assignment]
    scores = {}
    for layer in find_batchnorm_layers(model):
        live = np.asarray(values[layer.input], dtype=np.float64)
        _, _, jeffreys = drift_figures(live.mean(axis=0), live.var(axis=0), layer.mean, layer.var, layer.eps)
        scores[layer.name] = float(jeffreys.mean())
    return scores


def stats(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v2/models/mlp/stats")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_shifted_traffic_alerts_recalibration_swaps_in_without_a_failed_request_and_drift_recovers(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(11)
    base = rng.normal(size=(2000, 10)).astype(np.float32)
    # The statistics the network was exported with: those of the traffic it first serves.
    np.save(tmp_path / "base.npy", base)
    repository = tmp_path / "repository"
    (repository / "mlp" / "1").mkdir(parents=True)
    v1 = repository / "mlp" / "1" / "model.onnx"
    done = bn_export("recalibrate", OUT / "mlp_bn1d.onnx", "--data", tmp_path / "base.npy", "--out", v1)
    assert done.returncode == 0, done.stderr
    # A new sensor: three features with a gain and an offset.
    shifted = rng.normal(size=(2400, 10)).astype(np.float32)
    shifted[:, :3] = shifted[:, :3] * 2.5 + 1.5

    server = start_server(
        "--model-repository", str(repository), "--device", "cpu", "--intra-op-threads", "1",
        env={"BN_SERVE_DRIFT_MAX_FRACTION": "1.0"},
        timeout=120.0,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            serve_all(client, base[:800])
            before = stats(client)
            assert before["watched"] == "layers"
            assert before["drift"]["alerting"] is False
            assert before["drift"]["samples"] == 800

            recent = shifted[:1200]
            serve_all(client, recent)
            # The window holds both: what the monitors compare is the 2000 samples served so far.
            expected = reference_scores(v1, np.concatenate([base[:800], recent]))
            drifted = stats(client)
            served_scores = {entry["layer"]: entry["drift"]["score"] for entry in drifted["layers"]}
            assert served_scores.keys() == expected.keys()
            for name, score in expected.items():
                assert abs(served_scores[name] - score) <= 1e-3 * score + 1e-6
            alerting = {entry["layer"] for entry in drifted["layers"] if entry["drift"]["alerting"]}
            assert alerting == {name for name, score in expected.items() if score > DEFAULT_THRESHOLD}
            assert alerting
            assert drifted["drift"]["alerting"] is True
            assert drifted["drift"]["worst_layer"] == max(expected, key=expected.__getitem__)
            metrics = client.get("/metrics").text
            for name in expected:
                flag = "1.0" if name in alerting else "0.0"
                assert (
                    f'bn_serve_layer_drift_alerting{{layer="{name}",model="mlp",version="1"}} {flag}'
                    in metrics
                )
            assert "drift at BatchNorm layers of model mlp version 1" in server.output()

            # Recalibrate on the recent traffic, verify, copy in as version 2.
            np.save(tmp_path / "recent.npy", recent)
            new = tmp_path / "mlp.recalibrated.onnx"
            done = bn_export("recalibrate", v1, "--data", tmp_path / "recent.npy", "--out", new)
            assert done.returncode == 0, done.stderr
            checked = bn_export("verify", new)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            (repository / "mlp" / "2").mkdir()
            shutil.copy(new, repository / "mlp" / "2" / "model.onnx")

            # A client keeps sending shifted traffic while the new version loads.
            statuses: list[int] = []
            stop = threading.Event()

            def keep_sending() -> None:
                with httpx.Client(base_url=server.url, timeout=30) as sender:
                    i = 0
                    while not stop.is_set():
                        start = (i * BATCH) % 1200
                        statuses.append(send(sender, shifted[1200 + start : 1200 + start + BATCH]))
                        i += 1

            sender = threading.Thread(target=keep_sending)
            sender.start()
            try:
                time.sleep(0.3)
                loaded = client.post("/v2/repository/models/mlp/load")
                time.sleep(0.3)
            finally:
                stop.set()
                sender.join()
            assert loaded.status_code == 200, loaded.text
            assert len(statuses) > 2
            assert set(statuses) == {200}

            serve_all(client, shifted[1200:2400])
            after = stats(client)
            assert after["version"] == "2"
            assert after["drift"]["alerting"] is False
            assert after["drift"]["samples"] >= 1200
            assert all(entry["drift"]["score"] < 0.05 for entry in after["layers"])
            metrics = client.get("/metrics").text
            assert 'layer_drift_score{layer="/1/BatchNormalization",model="mlp",version="2"}' in metrics

            # Unloading removes the layer series with the model.
            assert client.post("/v2/repository/models/mlp/unload").status_code == 200
            assert "bn_serve_layer_drift" not in "".join(
                line for line in client.get("/metrics").text.splitlines() if not line.startswith("#")
            )
    finally:
        stop_server(server)
