"""`bn-export export CKPT.npz --out MODEL.onnx`: the frozen inference-mode ONNX graph of a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from bn_export.checkpoint import load_checkpoint
from bn_export.export import export_onnx
from bn_export.onnx_graph import DEFAULT_OPSET, DTYPES, FORMS


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="export a checkpoint as a frozen inference-mode ONNX graph",
        description="Write the checkpoint's frozen BatchNorm as ONNX, checked by onnx.checker and "
        "onnxruntime against the float64 inference formula before anything is written.",
    )
    parser.add_argument("checkpoint", help="checkpoint .npz written by `bn-export fit`")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument(
        "--form", choices=FORMS, default="batchnorm", help="graph form (default: %(default)s)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="input/output dtype (default: %(default)s)"
    )
    parser.add_argument(
        "--with-head", action="store_true", help="append the trained linear head (output `logits`)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.checkpoint)
    result = export_onnx(
        checkpoint, args.out, form=args.form, opset=args.opset, dtype=args.dtype, with_head=args.with_head
    )
    print(
        f"wrote {result.path} ({result.size_bytes} bytes, sha256 {result.sha256[:12]}): {result.form} form, "
        f"{result.dtype}, opset {result.opset}, IR {result.ir_version}; max error vs float64 formula "
        f"{result.max_error:.3g} ({result.error_ratio:.2g} of tolerance)"
    )
    return 0
