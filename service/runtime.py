"""onnxruntime: choosing execution providers and running sessions. The only module that imports it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from bn_export.providers import exact_providers
from service.datatypes import datatype_from_ort, numpy_dtype
from service.errors import ConfigurationError, ModelLoadError
from service.settings import Device

log = logging.getLogger("bn_serve")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _probe_model() -> bytes:
    """A one-node graph (`y = x + x`, float32) whose session proves that a provider really runs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    return bytes(model.SerializeToString())


def cuda_usable() -> tuple[bool, str]:
    """Whether CUDA works here: the provider is installed AND a session on it runs; else why not.

    onnxruntime falls back to the CPU silently when the CUDA libraries or device are missing, so the probe
    checks the providers the session actually got, then runs it.
    """
    if CUDA not in ort.get_available_providers():
        return False, f"this onnxruntime has no {CUDA} (install the 'gpu' extra: onnxruntime-gpu)"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* pip packages only once they are preloaded;
        # without this a machine whose CUDA comes from pip (not the system) looks like it has none.
        try:
            preload()
        except Exception as exc:
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    try:
        session = ort.InferenceSession(_probe_model(), providers=[CUDA, CPU])
        if CUDA not in session.get_providers():
            return False, f"{CUDA} is installed but no CUDA device or library could be initialised"
        session.run(None, {"x": np.ones(1, dtype=np.float32)})
    except Exception as exc:  # any failure of the probe means the same thing: CUDA is not usable
        return False, f"a session on {CUDA} failed: {exc}"
    return True, "ok"


def resolve_providers(device: Device) -> list[str]:
    """Execution providers for `device`: `auto` takes CUDA when usable, else the CPU with a warning;
    `cuda` raises `ConfigurationError` when CUDA is not usable; `cpu` is the CPU only."""
    if device == "cpu":
        providers = [CPU]
    else:
        usable, reason = cuda_usable()
        if usable:
            providers = [CUDA, CPU]
        elif device == "cuda":
            raise ConfigurationError(f"--device cuda was requested but CUDA is not usable: {reason}")
        else:
            log.warning("device auto: serving on the CPU because CUDA is not usable: %s", reason)
            providers = [CPU]
    log.info("execution providers: %s", ", ".join(providers))
    return providers


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: V2 datatype, and shape with None for each dynamic dimension.

    `sample_shape` is `shape[1:]` when the batch dimension alone is dynamic (a request's shape then
    matches when its own `shape[1:]` equals it), else None."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]
    sample_shape: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tail = self.shape[1:]
        batched = bool(self.shape) and self.shape[0] is None and None not in tail
        object.__setattr__(self, "sample_shape", tail if batched else None)

    def metadata_shape(self) -> list[int]:
        return [-1 if d is None else d for d in self.shape]


class Session:
    """One loaded ONNX model on onnxruntime. `run` is thread-safe and releases the GIL.

    Built from `data`, the file's bytes when given (so the graph served is the graph verified, whatever
    happens to the file later), else from `path`; errors name the file, not where it is on the server.
    """

    def __init__(
        self, path: Path, providers: Sequence[str], intra_op_threads: int, data: bytes | None = None
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # Inter-op parallelism does nothing for these single-chain graphs and would add threads.
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # onnxruntime's CPU arena keeps the largest run's buffers for good (~20 MiB after 8x3x224x224
        # requests); without it they go back with the heap's periodic trim, at no measured cost in speed
        # (benchmarks/README.md, "Resident memory after large requests, and runs I-L").
        options.enable_cpu_mem_arena = False
        try:
            self._session = ort.InferenceSession(
                str(path) if data is None else data,
                sess_options=options,
                providers=exact_providers(providers),
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from None
        self.providers: list[str] = list(self._session.get_providers())
        self.inputs = [_spec(node) for node in self._session.get_inputs()]
        self.outputs = [_spec(node) for node in self._session.get_outputs()]
        # What each request is validated against, built once here rather than per request.
        self.input_specs = {spec.name: spec for spec in self.inputs}
        self.input_dtypes = {spec.name: numpy_dtype(spec.datatype) for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        # Whether requests may merge at all: every input has a dynamic batch axis (see `batching.merge_key`).
        self.batchable = bool(self.inputs) and all(
            bool(spec.shape) and spec.shape[0] is None for spec in self.inputs
        )

    def run(self, output_names: Sequence[str], feeds: Mapping[str, NDArray[Any]]) -> list[NDArray[Any]]:
        """The named outputs for `feeds` (already validated against `inputs`)."""
        results = self._session.run(list(output_names), dict(feeds))
        return list(map(np.asarray, results))


def _spec(node: Any) -> TensorSpec:
    try:
        datatype = datatype_from_ort(node.type)
    except ValueError as exc:
        raise ModelLoadError(f"tensor {node.name!r}: {exc}") from None
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(name=node.name, datatype=datatype, shape=shape)


def is_invalid_argument(exc: BaseException) -> bool:
    """Whether onnxruntime refused a run's inputs (the caller's mistake) rather than failing itself."""
    return isinstance(exc, InvalidArgument)
