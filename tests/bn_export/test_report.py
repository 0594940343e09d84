"""`bn-export report`: PNG plots and a Markdown page from a checkpoint or an exported ONNX model."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bn_export.checkpoint import Checkpoint, Trajectory, save_checkpoint
from bn_export.cli import main
from bn_export.errors import MissingDependencyError, ModelFileError
from bn_export.onnx_graph import Form, build_model, checkpoint_metadata
from bn_export.report import (
    AFFINE_PLOT,
    CHANNELS_PLOT,
    PAGE_NAME,
    TRAJECTORY_PLOT,
    load_report_source,
    source_from_checkpoint,
    trajectory_gaps,
    write_report,
)

C = 5
EPS = 1e-3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def checkpoint() -> Checkpoint:
    rng = np.random.default_rng(0)
    moving_mean = rng.normal(size=C).astype(np.float32)
    moving_var = rng.uniform(0.5, 2.0, size=C).astype(np.float32)
    # An EMA from (0, 1) drifting towards the final statistics, recorded every 32 samples.
    weights = 1 - 0.9 ** np.arange(1, 11)[:, None]
    trajectory = Trajectory(
        samples=np.arange(1, 11, dtype=np.int64) * 32,
        mean=(weights * moving_mean).astype(np.float32),
        var=(1 + weights * (moving_var - 1)).astype(np.float32),
    )
    return Checkpoint(
        gamma=rng.uniform(0.5, 1.5, size=C).astype(np.float32),
        beta=rng.normal(0, 0.1, size=C).astype(np.float32),
        moving_mean=moving_mean,
        moving_var=moving_var,
        eps=EPS,
        momentum=0.9,
        axis=1,
        sample_shape=(C, 3, 3),
        stats="population",
        samples_seen=320,
        batches_seen=10,
        data_fingerprint="sha256:test",
        created="2024-01-01T00:00:00+00:00",
        version="0.1.0",
        trajectory=trajectory,
        extras={"seed": 0},
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (the IHDR chunk comes first), after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def embedded_images(page: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8"))


def test_a_checkpoint_report_writes_three_readable_pngs_embedded_by_the_page(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    path = save_checkpoint(checkpoint, tmp_path / "fit.ckpt.npz")
    files = write_report(load_report_source(path), tmp_path / "report")

    assert [p.name for p in files.plots] == [CHANNELS_PLOT, AFFINE_PLOT, TRAJECTORY_PLOT]
    assert files.page == tmp_path / "report" / PAGE_NAME
    for plot in files.plots:
        width, height = png_size(plot)
        assert 600 <= width <= 2000
        assert 200 <= height <= 1200
        assert plot.stat().st_size > 10_000  # drawn content, not an empty canvas
    assert embedded_images(files.page) == [CHANNELS_PLOT, AFFINE_PLOT, TRAJECTORY_PLOT]
    text = files.page.read_text(encoding="utf-8")
    assert "| statistics | population |" in text
    assert "| samples seen | 320 |" in text
    assert "| fit: seed | 0 |" in text


@pytest.mark.parametrize("form", ["batchnorm", "folded"])
def test_an_onnx_model_report_shows_the_statistics_frozen_into_it(
    checkpoint: Checkpoint, tmp_path: Path, form: Form
) -> None:
    model_path = tmp_path / "model.onnx"
    metadata = checkpoint_metadata(checkpoint, form, "float32")
    onnx.save(build_model(checkpoint, form=form, metadata=metadata), model_path)
    source = load_report_source(model_path)

    for name in ("gamma", "beta", "moving_mean", "moving_var"):
        np.testing.assert_array_equal(getattr(source, name), getattr(checkpoint, name).astype(np.float64))
    assert source.eps == EPS
    assert source.stats_kind == "population"
    assert source.trajectory is None
    files = write_report(source, tmp_path / "report")
    assert [p.name for p in files.plots] == [CHANNELS_PLOT, AFFINE_PLOT]
    for plot in files.plots:
        png_size(plot)
    assert embedded_images(files.page) == [CHANNELS_PLOT, AFFINE_PLOT]
    text = files.page.read_text(encoding="utf-8")
    assert "(ONNX model)" in text
    assert f"| form | {form} |" in text
    assert "does not carry the fit's trajectory" in text


def test_a_bare_batchnorm_graph_falls_back_to_its_float32_epsilon(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    model_path = tmp_path / "model.onnx"
    onnx.save(build_model(checkpoint), model_path)
    source = load_report_source(model_path)
    assert source.eps == pytest.approx(EPS, rel=1e-7)
    np.testing.assert_array_equal(source.moving_var, checkpoint.moving_var)


def test_the_same_input_gives_byte_identical_files(checkpoint: Checkpoint, tmp_path: Path) -> None:
    source = source_from_checkpoint(checkpoint, "fit")
    first = write_report(source, tmp_path / "a")
    second = write_report(source, tmp_path / "b")
    for a, b in zip((first.page, *first.plots), (second.page, *second.plots), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_trajectory_gaps_are_standardized_by_the_final_statistics(checkpoint: Checkpoint) -> None:
    source = source_from_checkpoint(checkpoint)
    final_std = np.sqrt(checkpoint.moving_var.astype(np.float64) + EPS)
    trajectory = Trajectory(
        samples=np.array([1, 2], dtype=np.int64),
        mean=np.stack([checkpoint.moving_mean + 2 * final_std, checkpoint.moving_mean]),
        var=np.stack([4 * (checkpoint.moving_var + EPS) - EPS, checkpoint.moving_var]),
    )
    mean_gap, log_ratio = trajectory_gaps(source, trajectory)
    np.testing.assert_allclose(mean_gap, [[2.0] * C, [0.0] * C], atol=1e-6)
    np.testing.assert_allclose(log_ratio, [[np.log(4.0)] * C, [0.0] * C], atol=1e-6)


def test_without_matplotlib_the_error_says_which_extra_to_install(
    checkpoint: Checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'frozen-bn[plot]'")):
        write_report(source_from_checkpoint(checkpoint), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_neither_checkpoint_nor_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(ModelFileError, match="neither a checkpoint"):
        load_report_source(path)


def test_an_onnx_model_without_frozen_statistics_is_refused(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(ModelFileError, match="not a frozen-bn model: no BatchNormalization node"):
        load_report_source(path)


def test_the_cli_prints_the_written_files_and_turns_errors_into_status_2(
    checkpoint: Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_checkpoint(checkpoint, tmp_path / "fit.ckpt.npz")
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in (PAGE_NAME, CHANNELS_PLOT, AFFINE_PLOT, TRAJECTORY_PLOT)]

    assert main(["report", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
