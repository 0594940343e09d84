"""bn-serve on the CUDA execution provider against the CPU provider, on the same machine, in one run.

Builds the serving benchmark's models, then for each device (cpu, cuda where usable):
- onnxruntime alone: time of one W3 run (8x3x224x224 FP32) and of a 1x64 run, median of repeats;
- bn-serve over HTTP on 127.0.0.1 (binary extension): requests/s and p50/p99 for W3 from `--clients`
  concurrent clients, each response checked against the float64 formula;
- exactness on the device: a sample's output alone equals its output inside a batch, bitwise.
Prints a table and writes JSON (`--out`, default benchmarks/results/gpu_serve.json).

    python benchmarks/gpu_serve.py [--requests 200] [--clients 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving.models import benchmark_models, write_repository
from benchmarks.serving.workloads import binary_request, decode_response, sample_input
from service.runtime import cuda_usable
from tests.service.conftest import start_server, stop_server

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _median_run_ms(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    feeds = {"input": x}
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _post(host_port: str, body: bytes, header_length: int) -> tuple[dict[str, str], bytes]:
    host, port = host_port.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(
            "POST",
            "/v2/models/bn_images/infer",
            body=body,
            headers={
                "Inference-Header-Content-Length": str(header_length),
                "Content-Type": "application/octet-stream",
            },
        )
        response = connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        return dict(response.getheaders()), payload
    finally:
        connection.close()


def _http_load(
    host_port: str, x: np.ndarray, expected: np.ndarray, requests: int, clients: int
) -> dict[str, Any]:
    body, header_length = binary_request(x)
    headers, payload = _post(host_port, body, header_length)
    got = decode_response(headers, payload)["output"]
    error = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = requests // clients

    def client() -> None:
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            _post(host_port, body, header_length)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "max_abs_error_vs_formula": error,
    }


def _bitwise_batch_invariance(session: ort.InferenceSession, x: np.ndarray) -> bool:
    together = session.run(None, {"input": x})[0]
    return all(
        together[i].tobytes() == session.run(None, {"input": x[i : i + 1]})[0][0].tobytes()
        for i in range(x.shape[0])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_serve.json"))
    args = parser.parse_args(argv)

    devices = ["cpu"]
    usable, reason = cuda_usable()
    if usable:
        devices.append("cuda")
    else:
        print(f"CUDA not usable, CPU only: {reason}")
    features, images = benchmark_models()
    w3 = sample_input(images, 8)
    w1 = sample_input(features, 1)
    expected = images.reference(w3)
    results: dict[str, Any] = {"onnxruntime": ort.__version__, "devices": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_repository(Path(tmp), (features, images))
        for device in devices:
            w3_session = ort.InferenceSession(str(paths["bn_images"]), providers=PROVIDERS[device])
            w1_session = ort.InferenceSession(str(paths["bn_features"]), providers=PROVIDERS[device])
            row: dict[str, Any] = {
                "providers": w3_session.get_providers(),
                "ort_w3_ms": _median_run_ms(w3_session, w3, args.repeats),
                "ort_w1_ms": _median_run_ms(w1_session, w1, args.repeats),
                "bitwise_alone_equals_in_batch": _bitwise_batch_invariance(w3_session, w3),
            }
            server = start_server("--model-repository", tmp, "--device", device)
            try:
                row["http_w3_binary"] = _http_load(
                    server.host_port, w3, expected, args.requests, args.clients
                )
            finally:
                stop_server(server)
            results["devices"][device] = row

    print(
        f"{'device':<6} {'ort W3 ms':>10} {'ort W1 ms':>10} {'HTTP W3 req/s':>14} "
        f"{'p50 ms':>8} {'p99 ms':>8} "
        f"{'max err':>9} {'bitwise':>8}"
    )
    for device, row in results["devices"].items():
        http = row["http_w3_binary"]
        print(
            f"{device:<6} {row['ort_w3_ms']:>10.2f} {row['ort_w1_ms']:>10.3f} "
            f"{http['requests_per_s']:>14.1f} "
            f"{http['p50_ms']:>8.1f} {http['p99_ms']:>8.1f} {http['max_abs_error_vs_formula']:>9.2e} "
            f"{row['bitwise_alone_equals_in_batch']!s:>8}"
        )
    if "cuda" in results["devices"]:
        cpu, cuda = results["devices"]["cpu"], results["devices"]["cuda"]
        results["ratios_cuda_over_cpu"] = {
            "ort_w3_speedup": cpu["ort_w3_ms"] / cuda["ort_w3_ms"],
            "http_w3_throughput": cuda["http_w3_binary"]["requests_per_s"]
            / cpu["http_w3_binary"]["requests_per_s"],
        }
        print("CUDA / CPU:", json.dumps(results["ratios_cuda_over_cpu"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
