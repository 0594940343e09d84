"""The package's public surface: the documented names resolve, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bn_export


@pytest.mark.parametrize("name", [n for n in bn_export.__all__ if n != "__version__"])
def test_public_name_resolves_to_its_defining_module(name: str) -> None:
    value = getattr(bn_export, name)
    assert value.__name__ == name


def test_importing_the_package_loads_neither_onnx_nor_onnxruntime() -> None:
    code = "import sys, bn_export; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = bn_export.no_such_name  # type: ignore[attr-defined]
