"""Hosts made of Linux network namespaces, for tests that need real network links between machines.

Each host is a network namespace holding one veth link, `eth0`, whose peer is a port of a bridge in a
namespace of its own (the switch), and one address in the /24 the caller names (a private range such as
10.213.41.0/24). Nothing is created in the root namespace: the hosts reach each other over their veth
links and the bridge, and nothing else (no default route, no link out of the machine), and deleting the
namespaces removes every link with them.

Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's `ip`; `unavailable_reason`
says why a test cannot run here, so it can skip rather than fail. Names carry the test process's pid, so
concurrent runs on one machine never share a namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, NamedTuple

LINK = "eth0"
BRIDGE = "br0"
IP_TIMEOUT_S = 10.0


class LinkBytes(NamedTuple):
    """Bytes a host's `eth0` received and sent since the link was created."""

    rx: int
    tx: int


def ip(*args: str) -> str:
    """Run `ip ARGS`, returning its stdout; a failure raises naming the command and its stderr."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """Why namespaced hosts cannot be built on this machine, or None when they can.

    Tries the whole recipe once (a namespace holding a bridge and a veth pair), so that a machine where a
    later step would fail (no bridge support in a container, say) skips as well.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"fbn-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed here (no CAP_SYS_ADMIN?): {exc}"
    try:
        ip("-n", probe, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"no bridge or veth links in a network namespace here: {exc}"
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One stand-in machine: a network namespace with the address `address` on its link `eth0`."""

    name: str
    namespace: str
    address: str

    def command(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.namespace, *map(str, argv)]

    def link_bytes(self) -> LinkBytes:
        """The kernel's byte counters of this host's `eth0`."""
        (link,) = json.loads(ip("-json", "-stats", "-n", self.namespace, "link", "show", "dev", LINK))
        stats = link["stats64"]
        return LinkBytes(rx=int(stats["rx"]["bytes"]), tx=int(stats["tx"]["bytes"]))

    def has_default_route(self) -> bool:
        return "default" in ip("-n", self.namespace, "route", "show")


@dataclass
class Network:
    """Hosts on one bridged /24; `close` (or leaving the `with` block) deletes every namespace."""

    tag: str
    subnet: str
    hosts: dict[str, Host] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fbn-{os.getpid()}-{self.tag}-sw"

    def _add_namespace(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("-n", namespace, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new namespace `name`, linked to the bridge, with the next free address of the subnet."""
        if not self.namespaces:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
            ip("-n", self.switch, "link", "set", BRIDGE, "up")
        host = Host(name, f"fbn-{os.getpid()}-{self.tag}-{name}", f"{self.subnet}.{len(self.hosts) + 1}")
        self._add_namespace(host.namespace)
        port = f"p-{name}"[:15]  # interface names are at most 15 bytes
        # Created in the switch with the peer placed straight into the host: no name in the root namespace.
        ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            LINK,
            "netns",
            host.namespace,
        )
        ip("-n", self.switch, "link", "set", port, "master", BRIDGE, "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", LINK)
        ip("-n", host.namespace, "link", "set", LINK, "up")
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Delete the namespaces (hosts first, then the switch); each failure is reported, none skipped."""
        failures = []
        for namespace in reversed(self.namespaces):
            try:
                ip("netns", "del", namespace)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failures.append(str(exc))
        self.namespaces.clear()
        if failures:
            raise RuntimeError("; ".join(failures))

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_network(tag: str, subnet: str, names: Sequence[str]) -> Network:
    """Hosts `names` on `subnet` (three octets, as `"10.213.41"`), at addresses .1, .2, ... in order."""
    network = Network(tag, subnet)
    try:
        for name in names:
            network.add_host(name)
    except BaseException:
        network.close()
        raise
    return network


class Process:
    """A long-running program on a host, its output (stdout and stderr) written to `log`."""

    def __init__(
        self, host: Host, argv: Sequence[str | os.PathLike[str]], log: Path, cwd: Path | None = None
    ) -> None:
        self.host = host
        self.log = log
        self._log_file: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            host.command(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        status = "running" if self.running() else f"exited {self.popen.returncode}"
        return f"--- {self.log.name} ({self.host.name}, {status}), last {len(text)} lines:\n" + "\n".join(
            text
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; only this process, by its pid."""
        if self.running():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log_file.close()


@contextlib.contextmanager
def printing_tails_on_failure(processes: Sequence[Process]) -> Iterator[None]:
    """Print the processes' log tails when the block raises (pytest shows a failed test's stdout)."""
    try:
        yield
    except BaseException:
        for process in processes:
            print(process.tail())
        raise
