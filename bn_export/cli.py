"""`bn-export`: the command line of the training side. Each subcommand lives in `bn_export.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bn_export import __version__
from bn_export.commands import export, fit, inspect, recalibrate, report, verify
from bn_export.errors import BnExportError

_COMMANDS = (fit, export, verify, inspect, report, recalibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bn-export",
        description="Fit Batch Normalization statistics, export them frozen into ONNX, and verify the graph.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a `BnExportError` becomes a one-line message and exit status 2, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except BnExportError as exc:
        print(f"bn-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bn-export {args.command}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
