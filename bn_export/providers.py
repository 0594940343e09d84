"""onnxruntime execution providers configured for exact float32 arithmetic.

On Ampere and newer GPUs the CUDA provider computes float32 MatMul/Gemm/Conv in TF32 by default (10-bit
mantissa): a linear head then differs from its float32 formula by ~1e-3 relative and, since cuBLAS picks
kernels by batch size, a sample's logits change with the size of its batch. frozen-bn promises float32
results and batch invariance, so every session it builds, to export, verify or serve, turns TF32 off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

ProviderSpec = str | tuple[str, Mapping[str, str]]

_EXACT_OPTIONS: Mapping[str, Mapping[str, str]] = {CUDA: {"use_tf32": "0"}}


def exact_providers(names: Sequence[str]) -> list[ProviderSpec]:
    """`names` as onnxruntime's `providers` argument, with the options that keep each one exact."""
    return [(name, dict(_EXACT_OPTIONS[name])) if name in _EXACT_OPTIONS else name for name in names]
