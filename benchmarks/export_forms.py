"""onnxruntime run time of the two exported forms, `batchnorm` and `folded`, on the serving workloads' shapes.

    python benchmarks/export_forms.py [--runs 2000] [--threads 1]

Builds both graphs of one checkpoint per shape with `bn_export.onnx_graph.build_model` (float32, the
default opset), loads each in its own onnxruntime CPU session with `--threads` intra-op threads (the
server's default on one core), and times `session.run` on the same input, interleaving the forms run by
run so that other load on the machine hits both alike. Prints the median and the 10th/90th percentiles
per form and shape, and the ratio folded / batchnorm of the medians.

Shapes: W1 (1, 64), W2 (256, 64) and W3 (8, 3, 224, 224), as in `benchmarks/serve.py`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from bn_export.checkpoint import Checkpoint
from bn_export.onnx_graph import FORMS, build_model

SHAPES = {"W1": (1, 64), "W2": (256, 64), "W3": (8, 3, 224, 224)}


def checkpoint(sample_shape: tuple[int, ...], seed: int = 0) -> Checkpoint:
    """A checkpoint with channels on axis 1 and statistics drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    channels = sample_shape[0]
    return Checkpoint(
        gamma=rng.uniform(0.5, 2.0, channels),
        beta=rng.standard_normal(channels),
        moving_mean=rng.standard_normal(channels),
        moving_var=rng.uniform(0.1, 5.0, channels),
        eps=1e-5,
        momentum=0.9,
        axis=1,
        sample_shape=sample_shape,
        stats="population",
        samples_seen=1000,
        batches_seen=10,
        data_fingerprint="sha256:benchmark",
        created="2026-11-25T00:00:00+00:00",
        version="benchmark",
    )


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000, help="timed runs per form and shape (W3: a tenth)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()

    print(f"| shape | {' | '.join(f'{f} median µs (p10-p90)' for f in FORMS)} | folded / batchnorm |")
    print(f"|---|{'---:|' * len(FORMS)}---:|")
    for name, shape in SHAPES.items():
        ckpt = checkpoint(shape[1:])
        sessions = {
            form: session(build_model(ckpt, form=form).SerializeToString(), args.threads) for form in FORMS
        }
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        runs = args.runs if np.prod(shape) < 1_000_000 else max(10, args.runs // 10)
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        for sess in sessions.values():  # warm-up: the first runs allocate
            for _ in range(5):
                sess.run(None, {"input": x})
        for _ in range(runs):
            for form, sess in sessions.items():
                started = time.perf_counter()
                sess.run(None, {"input": x})
                times[form].append(time.perf_counter() - started)
        cells = []
        for form in FORMS:
            p10, p50, p90 = np.percentile(np.array(times[form]) * 1e6, [10, 50, 90])
            cells.append(f"{p50:,.1f} ({p10:,.1f}-{p90:,.1f})")
        ratio = np.median(times["folded"]) / np.median(times["batchnorm"])
        print(f"| {name} {shape} | {' | '.join(cells)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
