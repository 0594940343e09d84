"""Verify time against network size: ResNet-50-shaped networks from 1/8 to full width, written in plain
PyTorch with random weights, exported by torch.onnx.export, verified with the default time budget; and the
full-size one served by a real `bn-serve` process, timed from start until the model answers ready (verified,
loaded and warmed up).

    python benchmarks/verify_size.py [--widths 0.125 0.25 0.5 1] [--budget 20] [--no-serve]

Needs PyTorch (the networks are generated here, never committed; nothing is downloaded). Prints one row per
width: parameters, GFLOPs per 224x224 image, file size, export-free verify time (wall, including the
structural proof), whether it passed, and what the budget allowed the empirical checks to run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bn_export.verify import verify_model

IMAGE = (3, 224, 224)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet50(nn.Module):
    """ResNet-50's layout (3, 4, 6, 3 bottlenecks), widths scaled by `scale` (1: 25.6 M parameters)."""

    def __init__(self, scale: float = 1.0, classes: int = 1000) -> None:
        super().__init__()
        base = max(8, int(64 * scale))
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers: list[nn.Module] = []
        cin = base
        for stage, blocks in enumerate((3, 4, 6, 3)):
            width = base * 2**stage
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if block == 0 and stage > 0 else 1))
                cin = width * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        generator = torch.Generator().manual_seed(0)
        for module in self.modules():  # statistics away from a fresh layer's, as a trained network's are
            if isinstance(module, nn.BatchNorm2d):
                with torch.no_grad():
                    module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) * 0.5 + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def gflops(model: nn.Module) -> float:
    """Multiply-adds of one 224x224 image through the convolutions and the linear layer, in billions."""
    total = 0
    hooks = []

    def count(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += int(output.numel()) * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, *IMAGE))
    for hook in hooks:
        hook.remove()
    return total / 1e9


def export(model: nn.Module, path: Path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, *IMAGE),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            do_constant_folding=False,  # keep the BatchNormalization nodes: the formula check reads them
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())


def serve_until_ready(root: Path, name: str, timeout: float = 300.0) -> float:
    """Seconds from starting `bn-serve` until /v2/models/{name}/ready answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "--model-repository", str(root), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while time.perf_counter() - started < timeout:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"bn-serve exited: {log.read().decode(errors='replace')[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=1):
                        return time.perf_counter() - started
                except OSError:
                    time.sleep(0.2)
            raise TimeoutError("bn-serve did not report the model ready")
        finally:
            process.terminate()
            process.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    parser.add_argument("--budget", type=float, default=None, help="verify's budget_s (default: its own)")
    parser.add_argument("--no-serve", action="store_true", help="skip timing bn-serve on the full network")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, torch {torch.__version__}")
    header = (
        f"{'width':>6} {'params':>8} {'GFLOPs':>7} {'MB':>6} {'verify s':>9} {'passed':>6}  budget used for"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full: Path | None = None
        for width in args.widths:
            torch.manual_seed(0)
            model = ResNet50(width).eval()
            params = sum(p.numel() for p in model.parameters())
            path = root / f"resnet50_{width:g}" / "1" / "model.onnx"
            path.parent.mkdir(parents=True)
            export(model, path)
            options = {} if args.budget is None else {"budget_s": args.budget}
            began = time.perf_counter()
            report = verify_model(path, **options)
            seconds = time.perf_counter() - began
            found = {check.name: check for check in report.checks}
            invariance = found["batch_invariance"].detail.split(" (sizes")[0].split(" in ")[-1]
            formula_samples = found["formula"].detail.split(" samples")[0].split(" on ")[-1]
            print(
                f"{width:>6g} {params / 1e6:>7.1f}M {gflops(model):>7.2f} {path.stat().st_size / 1e6:>6.1f} "
                f"{seconds:>9.1f} {report.passed!s:>6}  formula {formula_samples} samples, {invariance}"
            )
            if not report.passed:
                print(report.render())
            if width == max(args.widths):
                full = path
        if full is not None and not args.no_serve:
            for other in root.iterdir():
                if other != full.parents[1]:
                    shutil.rmtree(other)
            seconds = serve_until_ready(root, full.parents[1].name)
            print(
                f"bn-serve: {full.parents[1].name} verified, loaded and warmed up, ready in {seconds:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
