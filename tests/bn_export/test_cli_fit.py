"""`bn-export fit` end to end: the demo command, its summary, its options, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from bn_export.checkpoint import load_checkpoint
from bn_export.cli import main

DIGITS = str(files("bn_export") / "demo_data" / "digits.npz")


def test_demo_command_writes_a_checkpoint_with_a_trained_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo" / "digits.ckpt.npz"
    argv = ["fit", DIGITS, "--targets", DIGITS, "--head", "linear", "--loss", "cross-entropy"]
    status = main([*argv, "--stats", "population", "--epochs", "3", "--seed", "0", "--out", str(out)])
    summary = capsys.readouterr().out
    assert status == 0
    checkpoint = load_checkpoint(out)
    assert checkpoint.stats == "population"
    assert checkpoint.head is not None
    assert checkpoint.head.weight.shape == (64, 10)
    values = np.load(DIGITS)["data"].astype(np.float64)
    np.testing.assert_allclose(checkpoint.moving_mean, values.mean(axis=0), rtol=1e-6, atol=1e-6)
    assert checkpoint.extras["train_accuracy"] > 0.85
    for expected in ("1797 samples", "population", "GB/s", "accuracy", str(out)):
        assert expected in summary


def test_options_reach_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 3, 2, 5)).astype(np.float32))
    out = tmp_path / "c.npz"
    argv = ["fit", str(tmp_path / "x.npy"), "--out", str(out), "--batch-size", "8", "--epochs", "2"]
    argv += ["--momentum", "cumulative", "--eps", "0.001", "--axis", "-1", "--unbiased-moving-var"]
    assert main(argv) == 0
    checkpoint = load_checkpoint(out)
    assert (checkpoint.momentum, checkpoint.eps, checkpoint.axis) == (None, 0.001, 3)
    assert checkpoint.unbiased_moving_var
    assert (checkpoint.stats, checkpoint.batches_seen, checkpoint.samples_seen) == ("ema", 10, 80)
    assert "ema" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--head", "linear"], "--targets and --head go together"),
        (["--axis", "0"], "batch axis"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--targets", "missing.npy", "--head", "linear"], "missing.npy: no such file"),
    ],
)
def test_errors_are_one_line_without_traceback_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    np.save(tmp_path / "x.npy", np.ones((10, 3), np.float32))
    out = tmp_path / "c.npz"
    status = main(["fit", str(tmp_path / "x.npy"), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("bn-export fit: error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "x.npy"]


def test_nan_in_the_data_fails_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = np.ones((10, 3), np.float32)
    values[7, 2] = np.nan
    np.save(tmp_path / "x.npy", values)
    out = tmp_path / "c.npz"
    assert main(["fit", str(tmp_path / "x.npy"), "--out", str(out), "--batch-size", "4"]) == 2
    assert f"{tmp_path / 'x.npy'}: sample 7 in batch" in capsys.readouterr().err
    assert not out.exists()


def test_bad_momentum_is_an_argument_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "x.npy", "--out", str(tmp_path / "c.npz"), "--momentum", "1.5"])
    assert exit_info.value.code == 2
    assert "weight of the past" in capsys.readouterr().err


def test_console_script_fits_a_csv(tmp_path: Path) -> None:
    script = shutil.which("bn-export", path=str(Path(sys.executable).parent))
    assert script is not None, "the bn-export console script is not installed beside this Python"
    (tmp_path / "x.csv").write_text("a,b\n1,10\n2,20\n3,30\n4,40\n")
    out = tmp_path / "c.npz"
    result = subprocess.run(
        [script, "fit", str(tmp_path / "x.csv"), "--stats", "population", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    checkpoint = load_checkpoint(out)
    np.testing.assert_allclose(checkpoint.moving_mean, [2.5, 25.0])
    np.testing.assert_allclose(checkpoint.moving_var, [1.25, 125.0])
