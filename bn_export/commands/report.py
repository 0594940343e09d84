"""`bn-export report CKPT_OR_MODEL --out DIR`: plots of the frozen statistics and a Markdown page."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import onnx

from bn_export.recalibration_report import is_recalibrated, write_recalibration_report
from bn_export.report import PAGE_NAME, load_report_source, write_report


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="plot a checkpoint's or an ONNX model's statistics into PNGs and a Markdown page",
        description=(
            "Plot the per-channel frozen statistics (mean ± std), gamma and beta and, for a checkpoint that "
            f"recorded it, the moving statistics over the fit; write them with {PAGE_NAME} into DIR. "
            "For a network written by bn-export recalibrate, plot each layer's change instead: the shift of "
            "the mean in old standard deviations and the variance ratio. "
            "Needs matplotlib: pip install 'frozen-bn[plot]'."
        ),
    )
    parser.add_argument(
        "source", metavar="CKPT_OR_MODEL", type=Path, help="a checkpoint .npz or an ONNX model"
    )
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="directory to write into")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = _recalibrated_model(args.source)
    if model is not None:
        files = write_recalibration_report(model, args.out, args.source.name)
    else:
        files = write_report(load_report_source(args.source), args.out)
    for path in (files.page, *files.plots):
        print(path)
    return 0


def _recalibrated_model(path: Path) -> onnx.ModelProto | None:
    """The model at `path` if it is an ONNX model that `bn-export recalibrate` wrote, else None."""
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX after all: load_report_source says what it is
        return None
    return model if is_recalibrated(model) else None
