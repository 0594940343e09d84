"""`recalibrate(engine="dask")`: each exact pass in blocks on a real LocalCluster (two worker processes on
127.0.0.1), equal to the local passes to float64 rounding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import bn_export.recalibrate as recalibrate_module
from bn_export.cli import main
from bn_export.distributed import local_cluster
from bn_export.errors import DataError, InvalidInputError
from bn_export.recalibrate import recalibrate
from tests.bn_export.networks import Mlp, conv_net

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        local_cluster(n_workers=2, threads_per_worker=1) as cluster,
        distributed.Client(cluster) as connected,
    ):
        yield connected


def test_dask_passes_equal_local_ones_to_float64_rounding(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(300, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", other=np.zeros((2, 2)), images=x)
    spec = f"{tmp_path / 'x.npz'}:images"
    local = recalibrate(conv_net(), spec, batch_size=16)
    # Blocks of three batches of 16 samples of 432 bytes: seven tasks per pass, the last one short.
    monkeypatch.setattr(recalibrate_module, "DASK_BLOCK_BYTES", 16 * 432 * 3)
    remote = recalibrate(conv_net(), spec, batch_size=16, engine="dask", client=client)
    assert remote.passes == local.passes == 2
    for name, (mean, var) in local.statistics.items():
        np.testing.assert_allclose(remote.statistics[name][0], mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(remote.statistics[name][1], var, rtol=1e-12)
    assert [c.values_per_channel for c in remote.layers] == [c.values_per_channel for c in local.layers]


def test_bad_samples_on_a_worker_are_named_as_locally(tmp_path: Path, client: Any) -> None:
    x = np.random.default_rng(1).normal(size=(50, 5))
    x[37, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"sample 37 .* holds NaN or Inf"):
        recalibrate(Mlp.random().model(np.float64), tmp_path / "x.npy", engine="dask", client=client)


def test_the_dask_engine_is_for_exact_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 5)))
    with pytest.raises(InvalidInputError, match="use --mode exact"):
        recalibrate(Mlp.random().model(), tmp_path / "x.npy", mode="one-pass", engine="dask")
    onnx.save(Mlp.random().model(), tmp_path / "m.onnx")
    argv = ["recalibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy")]
    assert main([*argv, "--out", str(tmp_path / "o.onnx"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "a scheduler or client is for the dask engine" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
