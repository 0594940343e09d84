"""`bn-export inspect MODEL.onnx`: every BatchNormalization layer, frozen-bn's per-channel statistics with
their effective scale and shift, and the metadata; `--json` for scripts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bn_export.inspection import inspect_model


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="list a graph's BatchNormalization layers, per-channel statistics and metadata",
        description="List every BatchNormalization layer (node, input, channels, mean and var ranges, eps, "
        "largest |gamma/sqrt(var+eps)|), or say that there is none (fused away or absent); for a frozen-bn "
        "graph, each channel's mean, var, gamma, beta, effective scale and shift; then the metadata.",
    )
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    summary = inspect_model(args.model)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return 0
