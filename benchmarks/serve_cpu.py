"""Where a small request's time goes: server CPU per request under load, and (with py-spy) in which functions.

    python benchmarks/serve_cpu.py [--workloads W1-c1,W1-c32] [--duration 8]
                                   [--servers asgi-floor,floor,baseline,bn-serve]
                                   [--variant NAME:KEY=VALUE[,KEY=VALUE...]]... [--py-spy DIR] [--threads]

Each server runs alone pinned to CPU 0 (as in `benchmarks/serve.py`), wrk on CPU 1. Per workload the table
gives req/s, p50, p99, and the server's CPU time per completed request: utime + stime of every process in its
tree (all threads), read from `/proc/<pid>/stat` before and after the wrk run, over the requests wrk
completed; the part of it spent in the kernel (socket reads and writes, page faults) and the minor page
faults per request (fresh memory touched: each costs a trap and a zeroed page), and the read and write
system calls per request (`syscr` and `syscw` of `/proc/<pid>/io`: socket reads and writes, wake-ups of
the pool and the drift worker through their event file descriptors or pipes). At saturation (W1-c32)
that is the cost that bounds req/s on one core; the differences between the rows are what each layer
costs: uvicorn (`asgi-floor`), FastAPI (`floor`), bn-serve. `--servers loopback` adds the bare socket
server, W3-binary's floor: what moving its bytes costs the kernel.

`--variant` adds a bn-serve row with settings changed through its `BN_SERVE_*` variables, e.g.
`--variant no-drift:DRIFT=false` or `--variant quiet:LOG_LEVEL=warning`; the difference to `bn-serve` is what
the feature costs per request.

`--threads` adds, under each row, the CPU per request of each thread of the server, by name and nice value
(the event loop is `(main)`; a drift worker run with `BN_SERVE_DRIFT_WORKER_NICE` shows apart): what a
background thread costs, and whether it makes the serving threads slower too.

`--py-spy DIR` (needs `py-spy` on PATH: `pip install py-spy`) samples every bn-serve row once more under the
same load, py-spy on CPU 1 beside wrk, and writes `DIR/<server>-<workload>.txt` (collapsed stacks) with a
ranked summary: each function's share of the samples (inclusive), times the CPU per request measured without
the profiler, gives its microseconds per request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import load, servers, workloads
from benchmarks.serving.models import benchmark_models, write_repository

SERVER_CPU, LOAD_CPU = 0, 1
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """CPU seconds in user space and in the kernel, minor page faults, and read and write system calls of a
    process tree so far."""

    user_s: float
    system_s: float
    faults: int
    reads: int = 0
    writes: int = 0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.user_s - other.user_s,
            self.system_s - other.system_s,
            self.faults - other.faults,
            self.reads - other.reads,
            self.writes - other.writes,
        )


def read_stat(path: Path) -> tuple[str, list[str]] | None:
    """A `/proc/.../stat` file's command name and the fields after it (field 3 first), or None once the
    process or thread is gone. The name may hold spaces and parentheses: it ends at the last ')'."""
    try:
        stat = path.read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def tree_usage(pid: int) -> Usage:
    """`Usage` of `pid` and its descendants, all threads, reaped children included (the c* fields)."""
    user = system = faults = reads = writes = 0
    for member in servers.process_tree(pid):
        read = read_stat(Path(f"/proc/{member}/stat"))
        if read is None:
            continue
        fields = read[1]
        faults += int(fields[7]) + int(fields[8])
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
        calls = read_io(Path(f"/proc/{member}/io"))
        reads += calls.get("syscr", 0)
        writes += calls.get("syscw", 0)
    return Usage(user / TICKS, system / TICKS, faults, reads, writes)


def read_io(path: Path) -> dict[str, int]:
    """The counters of a `/proc/<pid>/io` file by name; empty once the process is gone (or unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if value.strip().isdigit():
            counters[name] = int(value)
    return counters


def thread_usage(pid: int) -> dict[str, float]:
    """CPU seconds so far of the threads of `pid`'s tree, summed by `comm` and nice value, each process's
    main thread apart (a drift worker run at another nice value shows on its own row)."""
    usage: dict[str, float] = {}
    for member in servers.process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            read = read_stat(task / "stat")
            if read is None:
                continue
            comm, fields = read
            key = f"{comm} nice {fields[16]}" + (" (main)" if task.name == str(member) else "")
            usage[key] = usage.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return usage


def print_thread_rows(threads_used: dict[str, float], requests: int) -> None:
    """One table row per thread that ran: its CPU per request, busiest first."""
    for key, spent in sorted(threads_used.items(), key=lambda item: -item[1]):
        if spent > 0:
            print(f"|   thread {key} | | | | | {spent / requests * 1e6:.0f} | | | | | |", flush=True)


def collapsed_summary(lines: Iterable[str], top: int = 40) -> list[tuple[str, float, float]]:
    """From py-spy's collapsed stacks (`frame;frame;... count`), each frame's (inclusive, self) share of all
    samples, the `top` frames by inclusive share. A frame recursing counts once per stack."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return []
    return [(frame, n / total, own[frame] / total) for frame, n in inclusive.most_common(top)]


def bn_serve_variants(specs: list[servers.ServerSpec], variants: list[str]) -> list[servers.ServerSpec]:
    """A copy of the bn-serve row per `NAME:KEY=VALUE,...`, with `BN_SERVE_KEY=VALUE` in its environment
    (`GRPC_PORT=N` also drops the row's `--no-grpc`, so that gRPC serves beside REST)."""
    base = next((s for s in specs if s.name == "bn-serve"), None)
    if base is None:
        return []
    out = []
    for variant in variants:
        name, _, assignments = variant.partition(":")
        env = dict(base.env)
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            env[f"BN_SERVE_{key.upper()}"] = value
        port = servers.free_port()
        argv = list(base.argv)
        argv[argv.index("--port") + 1] = str(port)
        if "BN_SERVE_GRPC_PORT" in env and "--no-grpc" in argv:
            argv.remove("--no-grpc")
        out.append(servers.ServerSpec(f"bn-serve {name}", "subject", tuple(argv), port, base.binary, env=env))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="W1-c1,W1-c32")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--servers", default="asgi-floor,floor,baseline,bn-serve")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR")
    parser.add_argument(
        "--threads", action="store_true", help="also print each thread's CPU per request (by name and nice)"
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") if args.py_spy else None
    if args.py_spy and py_spy is None:
        raise SystemExit("--py-spy needs py-spy on PATH (pip install py-spy)")
    wrk = load.ensure_wrk()
    chosen = workloads.select_workloads(args.workloads)
    wanted = {s.strip() for s in args.servers.split(",")}
    bn_serve = shutil.which("bn-serve", path=str(Path(sys.executable).parent)) or shutil.which("bn-serve")
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(
        "| server | workload | req/s | p50 ms | p99 ms | CPU us/req | of which kernel "
        "| page faults/req | reads/req | writes/req | CPU share of the core |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-serve-cpu-") as tmp:
        work = Path(tmp)
        models = {m.name: m for m in benchmark_models()}
        write_repository(work / "models", tuple(models.values()))
        requests, canned = workloads.write_bodies(work / "bodies", chosen, models)
        specs = servers.own_servers(work / "models", canned, bn_serve)
        specs = [s for s in specs if s.name in wanted] + bn_serve_variants(specs, args.variant)
        for spec in specs:
            with servers.running(spec, work / f"{spec.name}.log", SERVER_CPU) as process:
                for workload in chosen:
                    url = spec.url(spec.infer_path.format(model=workload.model))
                    request = requests[workload.name]
                    before = tree_usage(process.pid)
                    threads_before = thread_usage(process.pid) if args.threads else {}
                    result = load.run_wrk(wrk, url, request, workload.connections, args.duration, LOAD_CPU)
                    used = tree_usage(process.pid) - before
                    done = max(1, result.requests)
                    spent = used.user_s + used.system_s
                    per_request_us = spent / done * 1e6
                    print(
                        f"| {spec.name} | {workload.name} | {result.requests_per_s:,.0f} "
                        f"| {result.p50_ms:.2f} | {result.p99_ms:.2f} | {per_request_us:.0f} "
                        f"| {used.system_s / done * 1e6:.0f} "
                        f"| {used.faults / done:.1f} | {used.reads / done:.1f} | {used.writes / done:.1f} "
                        f"| {spent / result.duration_s:.2f} |",
                        flush=True,
                    )
                    if args.threads:
                        threads_after = thread_usage(process.pid)
                        print_thread_rows(
                            {key: t - threads_before.get(key, 0.0) for key, t in threads_after.items()}, done
                        )
                    if py_spy is not None and spec.role == "subject":
                        _profile(py_spy, wrk, spec, workload, url, request, process.pid, per_request_us, args)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    return 0


def _profile(
    py_spy: str,
    wrk: str,
    spec: servers.ServerSpec,
    workload: workloads.Workload,
    url: str,
    request: workloads.RequestFiles,
    pid: int,
    per_request_us: float,
    args: argparse.Namespace,
) -> None:
    args.py_spy.mkdir(parents=True, exist_ok=True)
    out = args.py_spy / f"{spec.name.replace(' ', '-')}-{workload.name}.txt"
    duration = max(1, round(args.duration))
    sampler = subprocess.Popen(
        ["taskset", "-c", str(LOAD_CPU), py_spy, "record", "--pid", str(pid), "--rate", "250",
         "--duration", str(duration), "--format", "raw", "--function", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    load.run_wrk(wrk, url, request, workload.connections, args.duration, LOAD_CPU)
    _, errors = sampler.communicate(timeout=duration + 60)
    if sampler.returncode != 0:
        print(f"  py-spy failed: {errors.decode(errors='replace')[-500:]}", flush=True)
        return
    summary = collapsed_summary(out.read_text().splitlines())
    lines = [
        f"{incl:6.1%} {incl * per_request_us:7.1f} us  self {own:6.1%}  {frame}"
        for frame, incl, own in summary
    ]
    (out.with_suffix(".summary.txt")).write_text("\n".join(lines) + "\n")
    print(f"  profile: {out} (summary beside it)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
