"""`bn-export report CKPT_OR_MODEL --out DIR`: plots of the frozen statistics and a Markdown page."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bn_export.report import PAGE_NAME, load_report_source, write_report


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="plot a checkpoint's or an ONNX model's statistics into PNGs and a Markdown page",
        description=(
            "Plot the per-channel frozen statistics (mean ± std), gamma and beta and, for a checkpoint that "
            f"recorded it, the moving statistics over the fit; write them with {PAGE_NAME} into DIR. "
            "Needs matplotlib: pip install 'frozen-bn[plot]'."
        ),
    )
    parser.add_argument(
        "source", metavar="CKPT_OR_MODEL", type=Path, help="a checkpoint .npz or an ONNX model"
    )
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="directory to write into")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    files = write_report(load_report_source(args.source), args.out)
    for path in (files.page, *files.plots):
        print(path)
    return 0
