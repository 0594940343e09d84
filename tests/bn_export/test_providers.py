"""Execution providers are configured for exact float32: TF32 off on CUDA, the CPU as it is."""

from __future__ import annotations

from bn_export.providers import CPU, CUDA, exact_providers


def test_cuda_gets_tf32_turned_off_and_the_cpu_is_passed_by_name() -> None:
    assert exact_providers([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]


def test_the_options_are_a_fresh_dict_each_time() -> None:
    first = exact_providers([CUDA])[0]
    assert isinstance(first, tuple)
    first[1]["use_tf32"] = "1"  # type: ignore[index]
    assert exact_providers([CUDA]) == [(CUDA, {"use_tf32": "0"})]
