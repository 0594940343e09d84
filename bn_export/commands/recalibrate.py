"""`bn-export recalibrate MODEL.onnx --data DATA --out NEW.onnx`: refit a network's BatchNorm statistics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bn_export.errors import InvalidInputError
from bn_export.recalibrate import DEFAULT_BATCH_SIZE, ENGINES, MODES, recalibrate, write_recalibrated


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "recalibrate",
        help="recompute the statistics of every BatchNormalization layer of an ONNX network on new data",
        description=(
            "Recompute the mean and variance of the BatchNormalization layers of MODEL on DATA (.npy "
            "memory-mapped, .npz [FILE.npz:KEY], .csv, or a directory of .npy shards) and write NEW.onnx, "
            "identical but for those statistics and the recalibration_* metadata, once it passes verify. "
            "exact (default): the population statistics of each layer's input with the layers upstream "
            "already recalibrated, one pass over DATA per depth of layers; one-pass: PyTorch's train-mode "
            "cumulative average (momentum=None) of the batch statistics, in one pass."
        ),
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="the network, BatchNormalization nodes kept")
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="DATA|NAME=DATA",
        help="samples, batch axis first, in the layout the network takes; a network with several inputs "
        "takes --data NAME=DATA once per input",
    )
    parser.add_argument("--out", required=True, metavar="NEW.onnx", help="recalibrated network to write")
    parser.add_argument("--mode", choices=MODES, default="exact", help="exact (default) or one-pass")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"samples per run of the network (default {DEFAULT_BATCH_SIZE}); one-pass statistics depend "
        "on it, exact ones do not",
    )
    parser.add_argument(
        "--layers", metavar="NAME,...", help="recalibrate only these layers (node names); default: all"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); dask: each exact pass in blocks on a Dask cluster whose "
        "workers read DATA by path (needs frozen-bn[dask])",
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --engine dask: the scheduler to use (tcp://host:8786); default: a local cluster",
    )
    parser.add_argument("--json", action="store_true", help="print the per-layer report as JSON")
    parser.set_defaults(handler=run)


def data_specs(values: list[str]) -> str | dict[str, str]:
    """One `DATA` for a one-input network, or `{NAME: DATA}` from `NAME=DATA` items."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return values[0]
    specs: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InvalidInputError(f"--data {value!r}: with several inputs give each as NAME=DATA")
        if name in specs:
            raise InvalidInputError(f"--data names input {name!r} twice")
        specs[name] = path
    return specs


def run(args: argparse.Namespace) -> int:
    """Recalibrate, verify, then write (nothing is written when any step fails) and report per layer."""
    layers = None if args.layers is None else [name for name in args.layers.split(",") if name]
    started = time.perf_counter()
    result = recalibrate(
        args.model,
        data_specs(args.data),
        mode=args.mode,
        batch_size=args.batch_size,
        layers=layers,
        progress=True,
        engine=args.engine,
        scheduler=args.scheduler,
    )
    elapsed = time.perf_counter() - started
    path = write_recalibrated(result, args.out)
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(path), "seconds": elapsed}, indent=2))
    else:
        print(result.render())
        print(f"time: {elapsed:.2f} s; wrote {path}", file=sys.stdout)
    return 0
