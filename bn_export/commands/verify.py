"""`bn-export verify MODEL.onnx`: prove the graph normalizes with frozen statistics; exit 0 only then."""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from bn_export.errors import DataError
from bn_export.probes import DEFAULT_BUDGET_S, DEFAULT_DYNAMIC_SIZE, parse_shapes
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
        "--data",
        help="samples to feed: .npy, or .npz with an array `data` (or a single array); for a model with "
        "several inputs, .npz with one array per input name",
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME:1x3x32x32",
        help="shape of the generated samples of input NAME (batch first, ignored), for the dimensions the "
        f"graph leaves dynamic (default: {DEFAULT_DYNAMIC_SIZE} each); repeat for several inputs",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="SECONDS",
        help="time the empirical checks (formula, batch_invariance) may take; they run as many samples and "
        "batches as it affords (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated samples (default: %(default)s)"
    )
    parser.set_defaults(handler=run)


def load_samples(path: str | Path, input_names: Sequence[str] = ()) -> NDArray[Any] | dict[str, NDArray[Any]]:
    """Samples (N, *sample) from `.npy`, or `.npz` array `data` or its only array; or, for a model with
    several `input_names`, a `.npz` with one array per name. Never unpickles."""
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
        if len(input_names) > 1 and set(input_names) <= set(names):
            return {name: np.asarray(loaded[name]) for name in input_names}
        if "data" in names:
            return np.asarray(loaded["data"])
        if len(names) == 1:
            return np.asarray(loaded[names[0]])
    raise DataError(f"{path}: .npz with arrays {', '.join(names) or '(none)'}; expected one named `data`")


def run(args: argparse.Namespace) -> int:
    try:
        shapes = parse_shapes(args.shape)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    data = None if args.data is None else load_samples(args.data, _input_names(args.model))
    report = verify_model(args.model, data=data, seed=args.seed, shapes=shapes, budget_s=args.budget)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.passed else 1


def _input_names(model: str) -> list[str]:
    """The model's data inputs (not its initializers); none when the file cannot be read (verify says why)."""
    try:
        graph = onnx.load(model, load_external_data=False).graph
    except Exception:  # not ONNX: verify_model reports it as such
        return []
    constants = {t.name for t in graph.initializer}
    return [value.name for value in graph.input if value.name not in constants]
