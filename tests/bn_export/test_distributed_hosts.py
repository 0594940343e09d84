"""The Dask fit across machines: scheduler, workers and driver on four hosts joined only by network links.

Each host is a Linux network namespace with its own address (tests/netns.py): the scheduler on A, one
worker on each of B and C, and `bn-export fit --engine dask --scheduler tcp://A:PORT` on D, so every message
between them crosses a veth link and a bridge, none the loopback. The shards sit on the one file system
under the same path for every host, as the README requires of a real cluster's shared storage. The
references are the single-machine population fit and numpy's float64 two-pass moments over the same
samples; the evidence that the work crossed the links is the scheduler's own record (which workers, at
which addresses, ran the block tasks) and the links' byte counters.

Needs root and iproute2 (it creates namespaces); skips elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from bn_export.checkpoint import load_checkpoint  # noqa: E402
from bn_export.export import export_onnx  # noqa: E402
from bn_export.fit import fit  # noqa: E402
from bn_export.verify import verify_model  # noqa: E402
from tests.netns import (  # noqa: E402
    Host,
    LinkBytes,
    Network,
    Process,
    printing_tails_on_failure,
    start_network,
    unavailable_reason,
)

RTOL = 1e-12
SUBNET = "10.213.41"  # private, and reachable only inside this test's namespaces (no route leaves them)
SCHEDULER_PORT = 8786
READY_TIMEOUT_S = 30
DRIVER_TIMEOUT_S = 30

# Runs on the driver's host: connects to the scheduler over the links and prints what the scheduler knows.
# "ready" waits for both workers and starts the scheduler's record of finished tasks (its task stream);
# a float argument instead lists the tasks finished since that time (every host shares the one clock).
SCHEDULER_PROBE = """
import json, sys
from distributed import Client

address, since = sys.argv[1], sys.argv[2]
with Client(address, timeout=30) as client:
    if since == "ready":
        client.wait_for_workers(2, timeout=30)
        client.get_task_stream()
        tasks = []
    else:
        tasks = [
            {"key": str(record["key"]), "worker": record["worker"], "status": record["status"]}
            for record in client.get_task_stream(start=float(since))
        ]
    info = client.scheduler_info()
    json.dump({"scheduler": info["address"], "workers": sorted(info["workers"]), "tasks": tasks}, sys.stdout)
"""


@dataclass
class Cluster:
    network: Network
    processes: list[Process]
    address: str

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def probe(self, since: str) -> dict[str, Any]:
        """The scheduler's view (`SCHEDULER_PROBE`), asked from the driver's host."""
        argv = [sys.executable, "-c", SCHEDULER_PROBE, self.address, since]
        probe = subprocess.Popen(
            self.host("driver").command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + READY_TIMEOUT_S + 10
        # Polled rather than waited on, so a scheduler or worker that died fails this at once.
        while probe.poll() is None and time.monotonic() < deadline:
            if not all(process.running() for process in self.processes):
                break
            time.sleep(0.1)
        if probe.poll() is None:
            probe.kill()
        out, err = probe.communicate()
        if probe.returncode != 0:
            tails = "\n".join(process.tail() for process in self.processes)
            raise RuntimeError(f"scheduler probe failed (exit {probe.returncode}):\n{err[-3000:]}\n{tails}")
        result: dict[str, Any] = json.loads(out)
        return result

    def fit(self, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
        """`bn-export fit DATA --stats population --engine dask --scheduler tcp://A:PORT`, on the driver."""
        argv = [sys.executable, "-m", "bn_export.cli", "fit", str(data), "--stats", "population"]
        argv += ["--engine", "dask", "--scheduler", self.address, "--out", str(out)]
        return subprocess.run(
            self.host("driver").command(argv),
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S,
            check=False,
        )

    def link_bytes(self) -> dict[str, LinkBytes]:
        return {name: host.link_bytes() for name, host in self.network.hosts.items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("dask-hosts")
    with contextlib.ExitStack() as cleanup:
        # Unwound in reverse even when a step fails: every process is stopped, then the namespaces deleted.
        network = cleanup.enter_context(
            start_network("dask", SUBNET, ["scheduler", "worker-b", "worker-c", "driver"])
        )
        scheduler = network.hosts["scheduler"]
        address = f"tcp://{scheduler.address}:{SCHEDULER_PORT}"
        scheduler_argv = [
            *(sys.executable, "-m", "distributed.cli.dask_scheduler"),
            *("--host", scheduler.address, "--port", str(SCHEDULER_PORT), "--no-dashboard"),
        ]
        processes = [Process(scheduler, scheduler_argv, logs / "scheduler.log", cwd=logs)]
        cleanup.callback(processes[0].stop)
        for name in ("worker-b", "worker-c"):
            worker = network.hosts[name]
            (logs / name).mkdir()
            worker_argv = [
                *(sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", name),
                *("--host", worker.address, "--nthreads", "1", "--no-nanny", "--no-dashboard"),
                *("--local-directory", str(logs / name), "--death-timeout", str(READY_TIMEOUT_S)),
            ]
            processes.append(Process(worker, worker_argv, logs / f"{name}.log", cwd=logs))
            cleanup.callback(processes[-1].stop)
        started = Cluster(network, processes, address)
        started.probe("ready")
        yield started


def _host_of(address: str) -> str:
    """The IP address of a Dask address `tcp://IP:PORT`."""
    return address.removeprefix("tcp://").rsplit(":", 1)[0]


def _write_shards(directory: Path, x: np.ndarray, cuts: list[int]) -> None:
    directory.mkdir()
    bounds = [0, *cuts, len(x)]
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        np.save(directory / f"shard-{i:03d}.npy", x[start:stop])


def test_hosts_reach_each_other_only_over_their_links(cluster: Cluster) -> None:
    with printing_tails_on_failure(cluster.processes):
        for host in cluster.network.hosts.values():
            assert not host.has_default_route(), f"{host.namespace} has a route out"
        info = cluster.probe(str(time.time()))
        assert info["scheduler"] == cluster.address
        # Each worker registered under its own host's address, so the scheduler reaches it over that link.
        assert sorted(_host_of(address) for address in info["workers"]) == [
            cluster.host("worker-b").address,
            cluster.host("worker-c").address,
        ]


def test_fit_driven_from_another_host_equals_the_single_machine_population_fit(
    cluster: Cluster, tmp_path: Path
) -> None:
    rng = np.random.default_rng(41)
    # A large offset against a small spread: a merge that lost digits would miss 1e-12.
    x = rng.normal(100.0, 0.5, size=(150, 4, 3, 3)) + rng.normal(0.0, 3.0, size=(1, 4, 1, 1))
    shards, out = tmp_path / "shards", tmp_path / "c.npz"
    _write_shards(shards, x, [7, 40, 41, 90, 120])

    with printing_tails_on_failure(cluster.processes):
        before, since = cluster.link_bytes(), time.time()
        result = cluster.fit(shards, out)
        after = cluster.link_bytes()
        assert result.returncode == 0, result.stderr
        tasks = cluster.probe(str(since))["tasks"]

        checkpoint = load_checkpoint(out)
        local = fit(shards, stats="population", batch_size=32)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(checkpoint.moving_mean, x64.mean(axis=(0, 2, 3)), rtol=RTOL, atol=0)
        np.testing.assert_allclose(checkpoint.moving_var, x64.var(axis=(0, 2, 3)), rtol=RTOL, atol=0)
        np.testing.assert_allclose(checkpoint.moving_mean, local.moving_mean, rtol=RTOL, atol=0)
        np.testing.assert_allclose(checkpoint.moving_var, local.moving_var, rtol=RTOL, atol=0)
        for name in ("axis", "sample_shape", "stats", "samples_seen", "data_fingerprint"):
            assert getattr(checkpoint, name) == getattr(local, name), name
        assert checkpoint.moving_var.dtype == np.float64
        assert checkpoint.extras["engine"] == "dask"
        assert checkpoint.extras["shards"] == checkpoint.extras["partitions"] == 6  # one block per shard
        assert "population on dask; 6 block(s)" in result.stdout

        model = tmp_path / "model.onnx"
        export_onnx(checkpoint, model)
        assert verify_model(model).passed

        # The scheduler's record: the six block tasks ran on both workers, at their hosts' addresses.
        blocks = [task for task in tasks if task["key"].startswith("bn-block-")]
        assert len(blocks) == 6, tasks
        assert {_host_of(task["worker"]) for task in blocks} == {
            cluster.host("worker-b").address,
            cluster.host("worker-c").address,
        }
        # Every host's link carried traffic during the fit (the workers' also carry their heartbeats, so
        # for them the record above is the sharper evidence; the driver's link carries nothing else).
        for name in ("scheduler", "worker-b", "worker-c", "driver"):
            assert after[name].rx > before[name].rx, name
            assert after[name].tx > before[name].tx, name


def test_truncated_shard_is_refused_by_the_driver_naming_it_before_any_task(
    cluster: Cluster, tmp_path: Path
) -> None:
    shards, out = tmp_path / "shards", tmp_path / "out" / "c.npz"
    _write_shards(shards, np.random.default_rng(42).normal(size=(30, 3, 4)), [10, 20])
    bad = shards / "shard-001.npy"
    bad.write_bytes(bad.read_bytes()[:-100])  # an interrupted copy: the header promises more than is there
    with printing_tails_on_failure(cluster.processes):
        since = time.time()
        result = cluster.fit(shards, out)
        assert result.returncode == 2, result.stderr
        assert f"{bad}: " in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
        # The driver reads every shard's header before it sends anything: no task reached the cluster.
        assert cluster.probe(str(since))["tasks"] == []


def test_nan_found_by_a_remote_worker_fails_the_fit_naming_the_shard_and_writes_no_checkpoint(
    cluster: Cluster, tmp_path: Path
) -> None:
    x = np.ones((30, 3, 4))
    x[23, 2, 1] = np.nan  # the driver reads headers only: a worker is the first to see this value
    shards, out = tmp_path / "shards", tmp_path / "out" / "c.npz"
    _write_shards(shards, x, [10, 20])
    with printing_tails_on_failure(cluster.processes):
        since = time.time()
        result = cluster.fit(shards, out)
        assert result.returncode == 2, result.stderr
        assert f"{shards / 'shard-002.npy'}: samples 0..9: " in result.stderr
        assert "NaN" in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
        # Raised by shard-002's block task (the third block) on a worker host, then carried over the links
        # to the driver.
        tasks = cluster.probe(str(since))["tasks"]
        failed = [task for task in tasks if task["key"].startswith("bn-block-") and task["status"] == "error"]
        assert [task["key"].rsplit("-", 1)[1] for task in failed] == ["2"], tasks
        assert _host_of(failed[0]["worker"]) in {
            cluster.host("worker-b").address,
            cluster.host("worker-c").address,
        }
