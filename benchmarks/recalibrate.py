"""Recalibration throughput: `bn-export recalibrate` against PyTorch's CPU path on the same network and data.

    python benchmarks/recalibrate.py [--samples 2048] [--batch-size 64] [--repeats 5] [--threads N]
                                     [--out PATH.json]

Two networks, each exported with `torch.onnx.export(..., do_constant_folding=False)` so its BatchNorm
layers stay nodes: a small ResNet on `--samples` 3x32x32 images (9 BatchNorm2d layers in 7 depth groups)
and an MLP on 16 times as many rows of 64 features (2 BatchNorm1d). The data is float32 in a temporary
`.npy`, memory-mapped, page cache warm.
Timed, best of `--repeats`, each over all of the data in batches of `--batch-size`:

- `torch train-mode`: PyTorch's one-pass reference, what fvcore's `update_bn_stats` runs: every BatchNorm
  with `momentum=None` and fresh running statistics, the model in train mode, one forward per batch under
  `torch.no_grad()`, batches read from the same memory map;
- `one-pass`: `recalibrate(mode="one-pass")`, the whole call (graph surgery, onnxruntime session, the pass,
  the data fingerprint), without the verify gate (see the README: a network of many layers is not yet
  verifiable);
- `exact`: `recalibrate(mode="exact")`, one pass per depth group; samples/s is DATA over the whole call,
  `per pass` that times the passes.

PyTorch and onnxruntime both run on `--threads` intra-op threads (default: the CPUs here). The runs are
interleaved (each round runs every method once) and the best round of each is kept, so that load from
other users of a shared machine falls on all methods alike; compare ratios, not absolute figures.
Prints samples/s and the ratio to PyTorch's (target: one-pass >= 1.0x), and writes
the figures as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bn_export.recalibrate import recalibrate


def _block(c_in: int, c_out: int, stride: int) -> nn.Module:
    return _Residual(c_in, c_out, stride)


class _Residual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _block(32, 32, 1),
        _block(32, 64, 2),
        _block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


#: network -> (builder, sample shape, samples per `--samples`): the MLP's rows are 48x smaller than an
#: image, so it gets 16x as many to run long enough to time.
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "resnet (3x32x32)": (resnet, (3, 32, 32), 1),
    "mlp (64)": (mlp, (64,), 16),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _export(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            sample,
            buffer,
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    path.write_bytes(buffer.getvalue())


def _torch_one_pass(model: nn.Module, data: np.ndarray, batch_size: int) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            # A view of the read-only memory map, as onnxruntime is fed: nothing writes to it.
            model(torch.from_numpy(np.asarray(data[start : start + batch_size])))


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best time of each run over `repeats` rounds, each round running every one once in turn, so that
    load from other users of a shared machine falls on all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, sample_shape, scale) in NETWORKS.items():
            torch.manual_seed(0)
            model = build().eval()
            rng = np.random.default_rng(0)
            samples = args.samples * scale
            values = rng.normal(0.5, 2.0, size=(samples, *sample_shape)).astype(np.float32)
            data_path, model_path = Path(tmp) / "x.npy", Path(tmp) / "net.onnx"
            np.save(data_path, values)
            _export(model, torch.from_numpy(values[:2]), model_path)
            data = np.load(data_path, mmap_mode="r")
            float(np.asarray(data).sum())  # warm the page cache
            runs: dict[str, Callable[[], Any]] = {
                "torch": lambda m=model, d=data: _torch_one_pass(m, d, args.batch_size),
                "one-pass": lambda m=model_path, d=data_path: recalibrate(
                    m, d, mode="one-pass", batch_size=args.batch_size, verify=False, threads=args.threads
                ),
                "exact": lambda m=model_path, d=data_path: recalibrate(
                    m, d, batch_size=args.batch_size, verify=False, threads=args.threads
                ),
            }
            passes = recalibrate(model_path, data_path, batch_size=args.batch_size, verify=False).passes
            best = _interleaved(runs, args.repeats)
            torch_s, one_s, exact_s = best["torch"], best["one-pass"], best["exact"]
            torch_rate = samples / torch_s
            for method, seconds, sample_passes in (
                ("torch train-mode", torch_s, 1),
                ("one-pass", one_s, 1),
                ("exact", exact_s, passes),
            ):
                rate = samples / seconds
                rows.append(
                    {
                        "network": name,
                        "samples": samples,
                        "method": method,
                        "passes": sample_passes,
                        "seconds": seconds,
                        "samples_per_s": rate,
                        "ratio_to_torch": rate / torch_rate,
                        "samples_per_s_per_pass": rate * sample_passes,
                    }
                )
    print(
        f"{args.samples} images, {args.samples * 16} rows, batches of {args.batch_size}, "
        f"torch threads {args.threads}, "
        f"{os.cpu_count()} CPUs ({_cpu_model()}), best of {args.repeats}"
    )
    print(f"{'network':<18} {'method':<17} {'passes':>6} {'samples/s':>10} {'x torch':>8} {'per pass':>10}")
    for row in rows:
        print(
            f"{row['network']:<18} {row['method']:<17} {row['passes']:>6} {row['samples_per_s']:>10.0f} "
            f"{row['ratio_to_torch']:>7.2f}x {row['samples_per_s_per_pass']:>10.0f}"
        )
    out = args.out or Path(__file__).parent / "results" / "recalibrate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
