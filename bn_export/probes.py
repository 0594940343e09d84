"""Run any ONNX model on samples for the empirical checks of `verify`: one onnxruntime session over all its
inputs, samples for each input (generated, or given), companion batches, and the time budget that sizes how
much of it is run.

A batch is a dict from input name to array, every array with the same number of rows (samples). Generated
samples: float inputs draw from a standard normal (around the stored statistics for frozen-bn's one-layer
graphs), integer inputs from 0 .. INTEGER_VALUES - 1 (valid indices of any table that has that many rows),
boolean inputs at random. A dimension the graph leaves dynamic, besides the batch, is DEFAULT_DYNAMIC_SIZE
unless a shape is given for that input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import ArrayLike, NDArray
from onnx import helper

from bn_export.graph_statistics import FrozenStatistics
from bn_export.onnx_graph import GraphIndex
from bn_export.providers import CPU, exact_providers
from bn_export.reference import along

DEFAULT_DYNAMIC_SIZE = 8
INTEGER_VALUES = 4
DEFAULT_BUDGET_S = 20.0

Batch = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, element dtype and declared shape (None for a dynamic dimension)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]


@dataclass
class Runtime:
    """The onnxruntime session the numeric checks share, and the inputs it takes."""

    session: ort.InferenceSession
    inputs: tuple[InputSpec, ...]

    def run(self, feeds: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        names = [out.name for out in self.session.get_outputs()]
        values = self.session.run(names, dict(feeds))
        return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph fixes on some input, or None when every input's batch is dynamic."""
        fixed = [spec.shape[0] for spec in self.inputs if spec.shape and spec.shape[0] is not None]
        return fixed[0] if fixed else None


@dataclass
class Budget:
    """Seconds the empirical checks may take, and the slowest run time per sample measured so far, by which
    each batch about to run is judged affordable."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    per_sample: float = 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def timed_run(self, runtime: Runtime, feeds: Batch) -> dict[str, NDArray[Any]]:
        began = time.perf_counter()
        outputs = runtime.run(feeds)
        self.per_sample = max(self.per_sample, (time.perf_counter() - began) / max(1, count(feeds)))
        return outputs

    def affords(self, samples: int, share: float = 1.0) -> bool:
        return samples * self.per_sample <= share * self.left()


def open_session(model: onnx.ModelProto, providers: Sequence[str] | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings on stderr would leak into a server's log at every load
    options.intra_op_num_threads = 1  # small probes: one thread is fastest and reproducible
    # No arena: it keeps each run's buffers reserved beside the next batch's, which adds up to two of the
    # largest batches to a server's peak memory at load.
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=exact_providers(providers or [CPU])
    )


def open_runtime(g: GraphIndex, providers: Sequence[str] | None) -> Runtime | str:
    """A session over `g`'s model, or why none can run it."""
    if not g.inputs:
        return "the graph takes no inputs: there are no samples to feed"
    specs = []
    for value in g.inputs:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            return f"input {value.name!r} is not a tensor"
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except Exception:
            return f"input {value.name!r} has no tensor element type"
        if dtype.kind not in "fiub":
            return f"input {value.name!r} has dtype {dtype}, expected numbers or booleans"
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim
        )
        if not shape:
            return f"input {value.name!r} is a scalar: it has no batch axis"
        specs.append(InputSpec(value.name, dtype, shape))
    try:
        session = open_session(g.model, providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        return f"onnxruntime cannot load the model: {one_line(exc)}"
    return Runtime(session, tuple(specs))


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def parse_shapes(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`name:1x3x32x32` (or `1x3x32x32` for a model with one input, under the name "") -> {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        name, _, dims = text.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r}: expected NAME:1x3x32x32") from None
        if any(d <= 0 for d in shape):
            raise ValueError(f"shape {text!r}: every dimension must be positive")
        shapes[name] = shape
    return shapes


def sample_shapes(runtime: Runtime, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """One sample's shape per input: fixed dims as declared, dynamic ones DEFAULT_DYNAMIC_SIZE, or the shape
    given for the input (its first entry, the batch, is ignored). Raises ValueError for a given shape that
    does not fit."""
    given = dict(shapes or {})
    if "" in given and len(runtime.inputs) == 1:
        given[runtime.inputs[0].name] = given.pop("")
    unknown = sorted(set(given) - {spec.name for spec in runtime.inputs})
    if unknown:
        names = ", ".join(spec.name for spec in runtime.inputs)
        raise ValueError(f"shape given for {', '.join(map(repr, unknown))}; the model's inputs are {names}")
    result = {}
    for spec in runtime.inputs:
        declared = spec.shape[1:]
        if spec.name in given:
            sample = tuple(int(d) for d in given[spec.name])[1:]
            if len(sample) != len(declared) or any(
                d is not None and d != s for d, s in zip(declared, sample, strict=True)
            ):
                shown = ["N", *("?" if d is None else str(d) for d in declared)]
                wanted = given[spec.name]
                raise ValueError(f"shape {wanted} for {spec.name!r} does not fit its ({', '.join(shown)})")
            result[spec.name] = sample
        else:
            result[spec.name] = tuple(DEFAULT_DYNAMIC_SIZE if d is None else d for d in declared)
    return result


def generate(
    runtime: Runtime,
    shapes: Mapping[str, tuple[int, ...]],
    samples: int,
    rng: np.random.Generator,
    stats: FrozenStatistics | None = None,
) -> Batch:
    """`samples` rows per input (see the module docstring). With `stats` and one float input, the values are
    drawn around the stored statistics (mean ± 2 std per channel)."""
    batch: Batch = {}
    for spec in runtime.inputs:
        shape = (samples, *shapes[spec.name])
        if spec.dtype.kind == "b":
            batch[spec.name] = rng.integers(0, 2, shape).astype(bool)
            continue
        if spec.dtype.kind in "iu":
            batch[spec.name] = rng.integers(0, INTEGER_VALUES, shape).astype(spec.dtype)
            continue
        x = rng.standard_normal(shape)
        single = len(runtime.inputs) == 1
        if stats is not None and single and stats.axis < len(shape) and shape[stats.axis] == stats.mean.size:
            with np.errstate(all="ignore"):
                std = np.sqrt(np.abs(stats.var) + abs(stats.eps))
            center = along(np.nan_to_num(stats.mean), stats.axis, len(shape))
            spread = along(np.nan_to_num(std, nan=1.0, posinf=1.0), stats.axis, len(shape))
            # In place: 64 image-sized float64 samples are ~77 MB each copy, and a server verifies at load.
            x *= 2 * spread
            x += center
        batch[spec.name] = x.astype(spec.dtype)
    return batch


def prepare_data(data: ArrayLike | Mapping[str, ArrayLike], runtime: Runtime) -> Batch:
    """Given samples as a batch: one array for a model with one input, else one per input name."""
    if isinstance(data, Mapping):
        arrays = {str(name): np.asarray(value) for name, value in data.items()}
    elif len(runtime.inputs) == 1:
        arrays = {runtime.inputs[0].name: np.asarray(data)}
    else:
        names = ", ".join(spec.name for spec in runtime.inputs)
        raise ValueError(f"the model takes {len(runtime.inputs)} inputs ({names}): give one array per name")
    missing = [spec.name for spec in runtime.inputs if spec.name not in arrays]
    if missing:
        raise ValueError(f"no data for input(s) {', '.join(missing)}")
    batch: Batch = {}
    for spec in runtime.inputs:
        x = arrays[spec.name]
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise ValueError(f"data for {spec.name!r} has dtype {x.dtype}, expected numbers")
        if x.ndim != len(spec.shape) or any(
            e is not None and e != s for e, s in zip(spec.shape[1:], x.shape[1:], strict=True)
        ):
            shown = tuple("N" if e is None else e for e in spec.shape)
            raise ValueError(f"data has shape {x.shape}, the model takes {shown}")
        if x.shape[0] == 0:
            raise ValueError("data has no samples")
        batch[spec.name] = x.astype(spec.dtype)
    if len({len(x) for x in batch.values()}) != 1:
        raise ValueError("the inputs' data have different numbers of samples")
    return batch


def count(batch: Mapping[str, NDArray[Any]]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def rows(batch: Mapping[str, NDArray[Any]], index: slice | Sequence[int] | NDArray[Any]) -> Batch:
    return {name: value[index] for name, value in batch.items()}


def sample_values(batch: Mapping[str, NDArray[Any]]) -> int:
    """How many values one sample holds, over every input."""
    return sum(int(np.prod(value.shape[1:])) for value in batch.values())


def sample_bytes(batch: Mapping[str, NDArray[Any]]) -> int:
    return sum(int(np.prod(value.shape[1:])) * value.dtype.itemsize for value in batch.values())


def companions(kind: str, pool: Batch, samples: int, rng: np.random.Generator) -> Batch:
    """`samples` rows of one kind, shaped and typed like `pool`'s, built so that no value overflows its dtype
    (an overflow would warn, and verify never prints). Integer and boolean inputs get rows of the pool (or
    zeros): values past a table's rows would fail a lookup, not prove anything."""
    picks = rng.integers(0, count(pool), samples)
    batch: Batch = {}
    for name, values in pool.items():
        dtype = values.dtype
        shape = (samples, *values.shape[1:])
        if kind == "zeros":
            batch[name] = np.zeros(shape, dtype)
        elif kind == "random" or dtype.kind != "f":
            batch[name] = values[picks]
        elif kind == "huge":
            huge = float(np.finfo(dtype).max) / 4
            signs = rng.integers(0, 2, shape, dtype=np.int8).astype(bool)
            batch[name] = np.where(signs, dtype.type(huge), dtype.type(-huge))
        else:
            # -10·|x|, with |x| clipped to huge/10 first so the product stays finite: float16 data past
            # |x| ~ 6550 would overflow. In the input dtype, so the largest batch takes no float64 copies.
            huge = float(np.finfo(dtype).max) / 4
            negative = np.abs(values[picks])
            np.minimum(negative, dtype.type(huge / 10), out=negative)
            negative *= dtype.type(-10)
            batch[name] = negative
    return batch
