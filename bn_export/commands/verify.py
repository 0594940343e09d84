"""`bn-export verify MODEL.onnx`: prove the graph normalizes with frozen statistics; exit 0 only then."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bn_export.errors import DataError
from bn_export.verify import verify_model


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check an ONNX graph is frozen: inference mode, valid statistics, formula, batch invariance",
        description="Run every check of bn_export.verify and print each with its figure. "
        "Exit status 0 when all pass, 1 when any fails, 2 when the file is not an ONNX model.",
    )
    parser.add_argument("model", help="ONNX file")
    parser.add_argument(
        "--data", help="samples to feed: .npy, or .npz with an array `data` (or a single array)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated samples (default: %(default)s)"
    )
    parser.set_defaults(handler=run)


def load_samples(path: str | Path) -> NDArray[Any]:
    """Samples (N, *sample) from `.npy`, or `.npz` array `data` or its only array; never unpickles."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return np.asarray(loaded)
    with loaded:
        names = loaded.files
        if "data" in names:
            return np.asarray(loaded["data"])
        if len(names) == 1:
            return np.asarray(loaded[names[0]])
    raise DataError(f"{path}: .npz with arrays {', '.join(names) or '(none)'}; expected one named `data`")


def run(args: argparse.Namespace) -> int:
    data = None if args.data is None else load_samples(args.data)
    report = verify_model(args.model, data=data, seed=args.seed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.passed else 1
