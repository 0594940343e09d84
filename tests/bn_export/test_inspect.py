"""inspect_model and `bn-export inspect`: the per-channel table and metadata of both forms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bn_export.cli import main
from bn_export.export import export_onnx
from bn_export.inspection import inspect_model
from tests.bn_export.graphs import batch_statistics_model, make_checkpoint


@pytest.mark.parametrize("form", ["batchnorm", "folded"])
def test_inspect_shows_statistics_and_effective_scale_and_shift(tmp_path: Path, form: str) -> None:
    checkpoint = make_checkpoint((4, 5, 3), 3)
    export_onnx(checkpoint, tmp_path / "m.onnx", form=form, dtype="float64")  # type: ignore[arg-type]
    summary = inspect_model(tmp_path / "m.onnx")
    assert summary.statistics is not None
    assert summary.scale is not None
    assert summary.shift is not None
    scale = checkpoint.gamma / np.sqrt(checkpoint.moving_var + checkpoint.eps)
    np.testing.assert_allclose(summary.scale, scale, rtol=1e-7)
    np.testing.assert_allclose(summary.shift, checkpoint.beta - checkpoint.moving_mean * scale, rtol=1e-7)
    np.testing.assert_array_equal(summary.statistics.var, checkpoint.moving_var)
    assert summary.statistics.axis == 3
    assert summary.metadata["form"] == form
    text = summary.render()
    assert "shift" in text
    assert f"{checkpoint.moving_mean[2]:.6g}" in text


def test_cli_inspect_prints_table_and_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export_onnx(make_checkpoint((3, 4), 1), tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in {"0", "1", "2"}]
    assert len(rows) == 3
    assert "data_fingerprint" in out
    assert "statistics_kind" in out


def test_inspect_graph_without_frozen_statistics_says_so(tmp_path: Path) -> None:
    summary = inspect_model(batch_statistics_model())
    assert summary.statistics is None
    assert "no frozen statistics" in summary.render()


def test_cli_inspect_non_onnx_file_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.onnx").write_text("nope")
    assert main(["inspect", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
