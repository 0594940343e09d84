"""`bn-export inspect MODEL.onnx`: the per-channel statistics, effective scale and shift, and metadata."""

from __future__ import annotations

import argparse
from typing import Any

from bn_export.inspection import inspect_model


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="print a frozen graph's per-channel statistics and metadata",
        description="Print each channel's mean, var, gamma, beta, effective scale and shift, then metadata.",
    )
    parser.add_argument("model", help="ONNX file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(inspect_model(args.model).render())
    return 0
