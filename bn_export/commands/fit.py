"""`bn-export fit DATA --out CKPT.npz`: fit BatchNorm statistics (and optionally a linear head) on DATA."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bn_export.checkpoint import save_checkpoint
from bn_export.data import open_dataset
from bn_export.distributed import fit_population_dask, is_zarr
from bn_export.errors import InvalidInputError
from bn_export.fit import DEFAULT_LR, fit
from bn_export.head import LOSSES, OPTIMIZERS


def _momentum(text: str) -> float | None:
    """`cumulative` (a running average of all batches, PyTorch's momentum=None) or a number in [0, 1]."""
    if text == "cumulative":
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or cumulative, got {text!r}") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (the weight of the past), got {value}")
    return value


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "fit",
        help="fit BatchNorm statistics (and optionally a linear head) on a dataset; write a checkpoint",
        description=(
            "Fit a BatchNorm layer on DATA (.npy memory-mapped, .npz [FILE.npz:KEY], .csv, or a directory "
            "of .npy shards) and write a checkpoint. --stats population stores the exact statistics of the "
            "whole dataset (one pass suffices without a head, whatever --epochs says); --stats ema stores "
            "the moving averages a training loop would leave."
        ),
    )
    parser.add_argument("data", metavar="DATA", help="samples, batch axis first: (N, C, *spatial) by default")
    parser.add_argument("--out", required=True, metavar="CKPT.npz", help="checkpoint to write")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    parser.add_argument(
        "--momentum",
        type=_momentum,
        default=0.9,
        metavar="M|cumulative",
        help="weight of the past in moving = moving*M + batch*(1-M) (ONNX/Keras; PyTorch's is 1-M), "
        "or 'cumulative' for a running average (default 0.9)",
    )
    parser.add_argument("--eps", type=float, default=1e-5, help="added to the variance (default 1e-5)")
    parser.add_argument("--axis", type=int, default=1, help="channel axis, batch included (1; -1 = last)")
    parser.add_argument("--stats", choices=("ema", "population"), default="ema", help="statistics to freeze")
    parser.add_argument("--seed", type=int, default=0, help="seed for shuffling and the head's init")
    parser.add_argument(
        "--unbiased-moving-var", action="store_true", help="fold the unbiased variance (PyTorch's choice)"
    )
    parser.add_argument("--targets", metavar="FILE", help="targets: .npy, .npz (array 'targets'), .csv")
    parser.add_argument("--head", choices=("linear",), help="train a linear head on the normalized features")
    parser.add_argument("--loss", choices=LOSSES, default="cross-entropy", help="the head's loss")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="the head's optimizer")
    parser.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="local: this process (default); dask: population statistics over a directory or glob of .npy "
        "shards, or a Zarr array (X.zarr, or a group's array 'data'), on a Dask cluster (needs "
        "frozen-bn[dask] and --stats population)",
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --engine dask: the scheduler to use (tcp://host:8786); default: a local cluster",
    )
    parser.add_argument(
        "--zarr-missing-chunks",
        choices=("error", "fill"),
        help="with a Zarr array: a chunk absent from the store fails the fit (error, the default) or is read "
        "as the fill value (fill: for arrays written with zarr's write_empty_chunks=False)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fit, then write the checkpoint (only once the fit succeeded) and print a short summary."""
    if (args.targets is None) != (args.head is None):
        raise InvalidInputError("--targets and --head go together: give both to train a head, or neither")
    if args.engine == "dask":
        return _run_dask(args)
    if args.scheduler is not None:
        raise InvalidInputError("--scheduler is for --engine dask")
    if args.zarr_missing_chunks is not None:
        raise InvalidInputError("--zarr-missing-chunks is for a Zarr array with --engine dask")
    if is_zarr(args.data):
        raise InvalidInputError(f"{args.data}: a Zarr array is read by --engine dask --stats population only")
    dataset = open_dataset(args.data)
    started = time.perf_counter()
    checkpoint = fit(
        dataset,
        batch_size=args.batch_size,
        epochs=args.epochs,
        momentum=args.momentum,
        eps=args.eps,
        axis=args.axis,
        stats=args.stats,
        seed=args.seed,
        unbiased_moving_var=args.unbiased_moving_var,
        targets=args.targets,
        head=args.head,
        loss=args.loss,
        lr=args.lr,
        optimizer=args.optimizer,
        progress=True,
    )
    elapsed = time.perf_counter() - started
    path = save_checkpoint(checkpoint, args.out)
    extras = checkpoint.extras
    throughput = extras["bytes_read"] / elapsed / 1e9 if elapsed > 0 else float("inf")
    lines = [
        f"fitted {dataset.num_samples} samples of shape {dataset.sample_shape} ({dataset.dtype}), "
        f"{checkpoint.num_channels} channels on axis {checkpoint.axis}",
        f"statistics: {checkpoint.stats}; {extras['epochs']} epoch(s), {checkpoint.batches_seen} batches "
        f"of up to {extras['batch_size']}",
        f"time: {elapsed:.2f} s, {throughput:.2f} GB/s over {extras['bytes_read'] / 1e9:.3f} GB read",
    ]
    if args.stats == "population" and args.head is None and args.epochs > 1:
        lines.append("note: population statistics need one pass; --epochs was not used")
    if checkpoint.head is not None:
        head = f"head: {checkpoint.head.loss} loss {extras['train_loss']:.4f} on the training data"
        if "train_accuracy" in extras:
            head += f", accuracy {extras['train_accuracy']:.2%}"
        lines.append(head)
    lines.append(f"wrote {path}")
    print("\n".join(lines), file=sys.stdout)
    return 0


def _run_dask(args: argparse.Namespace) -> int:
    """`--engine dask`: population statistics of `.npy` shards or a Zarr array, written on success only."""
    if args.stats != "population" or args.head is not None:
        raise InvalidInputError(
            "--engine dask fits population statistics only: use --stats population, no --head"
        )
    zarr_source = is_zarr(args.data)
    if args.zarr_missing_chunks is not None and not zarr_source:
        raise InvalidInputError(f"--zarr-missing-chunks is for a Zarr array; {args.data} is not one")
    started = time.perf_counter()
    checkpoint = fit_population_dask(
        args.data,
        axis=args.axis,
        scheduler=args.scheduler,
        eps=args.eps,
        unbiased_moving_var=args.unbiased_moving_var,
        missing_chunks=args.zarr_missing_chunks or "error",
    )
    elapsed = time.perf_counter() - started
    path = save_checkpoint(checkpoint, args.out)
    extras = checkpoint.extras
    throughput = extras["bytes_read"] / elapsed / 1e9 if elapsed > 0 else float("inf")
    source = (
        f"a Zarr array in chunks of {tuple(extras['zarr_chunks'])}"
        if zarr_source
        else f"{extras['shards']} shard(s)"
    )
    lines = [
        f"fitted {checkpoint.samples_seen} samples of shape {checkpoint.sample_shape} from "
        f"{source}, {checkpoint.num_channels} channels on axis {checkpoint.axis}",
        f"statistics: population on dask; {extras['partitions']} block(s) of up to {extras['block_samples']}",
        f"time: {elapsed:.2f} s, {throughput:.2f} GB/s over {extras['bytes_read'] / 1e9:.3f} GB read",
        f"wrote {path}",
    ]
    print("\n".join(lines), file=sys.stdout)
    return 0
