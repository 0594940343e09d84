"""Results as ratios to the baseline, the framework floor (FastAPI), uvicorn's floor (a bare ASGI callable)
and the loopback floor of the same run; the table, the JSON document, and the targets bn-serve is held to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.serving.workloads import WORKLOADS

WORKLOAD_ORDER = tuple(w.name for w in WORKLOADS)
RATIO_METRICS = ("requests_per_s", "p50_ms", "p99_ms", "rss_mib")
REFERENCES = {"baseline": "baseline", "floor": "floor", "asgi": "asgi", "loopback": "wire"}
TRITON = "triton"  # the peer the serving targets are set against


@dataclass
class Row:
    """One server under one workload; `status`: "ok", "skipped" (unsupported) or "failed" (see `detail`)."""

    server: str
    role: str
    workload: str
    status: str
    detail: str = ""
    requests_per_s: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    errors: int = 0
    rss_mib: float = math.nan
    pss_mib: float = math.nan
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)


def add_ratios(rows: Sequence[Row]) -> None:
    """Fill `row.ratios[reference][metric] = row.metric / reference_row.metric` for each reference server
    (by role) that completed the same workload. Above 1 is better for req/s, worse for latency and memory."""
    by_key = {(r.role, r.workload): r for r in rows if r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        for label, role in REFERENCES.items():
            reference = by_key.get((role, row.workload))
            if reference is None:
                continue
            row.ratios[label] = {m: _ratio(getattr(row, m), getattr(reference, m)) for m in RATIO_METRICS}


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference and not math.isnan(reference) else math.nan


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    """A plain-text table, one line per server and workload, grouped by workload."""
    header = (
        "workload", "server", "req/s", "p50 ms", "p99 ms", "errors", "RSS MiB",
        "req/s x base", "x floor", "x asgi", "x loop", "p99 x base", "p99 x floor",
    )  # fmt: skip
    order = {name: i for i, name in enumerate(WORKLOAD_ORDER)}
    lines: list[tuple[str, ...]] = [header]
    notes = []
    for row in sorted(rows, key=lambda r: (order.get(r.workload, len(order)), -_or_zero(r.requests_per_s))):
        if row.status != "ok":
            lines.append((row.workload, row.server, row.status, *("",) * (len(header) - 3)))
            notes.append(f"{row.server} {row.workload} {row.status}: {row.detail}")
            continue
        ratio = row.ratios
        lines.append(
            (
                row.workload,
                row.server,
                _fmt(row.requests_per_s),
                _fmt(row.p50_ms, 2),
                _fmt(row.p99_ms, 2),
                str(row.errors),
                _fmt(row.rss_mib, 0),
                _fmt(ratio.get("baseline", {}).get("requests_per_s", math.nan), 2),
                _fmt(ratio.get("floor", {}).get("requests_per_s", math.nan), 2),
                _fmt(ratio.get("asgi", {}).get("requests_per_s", math.nan), 2),
                _fmt(ratio.get("loopback", {}).get("requests_per_s", math.nan), 2),
                _fmt(ratio.get("baseline", {}).get("p99_ms", math.nan), 2),
                _fmt(ratio.get("floor", {}).get("p99_ms", math.nan), 2),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ) + "".join(f"\n  {note[:200]}" for note in notes)


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _get(rows: Sequence[Row], server_role: str, workload: str) -> list[Row]:
    return [r for r in rows if r.role == server_role and r.workload == workload and r.status == "ok"]


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """bn-serve's targets, each {"target", "met": True/False/None (not measurable here), "detail"}.

    The peer is Triton where it ran, else the best peer on the workload; memory compares each server's peak
    RSS measured after its workloads with the leanest peer's.
    """
    subject = [r for r in rows if r.role == "subject" and r.status == "ok"]
    out: list[dict[str, Any]] = []

    def record(target: str, met: bool | None, detail: str) -> None:
        out.append({"target": target, "met": met, "detail": detail})

    def one(role: str, workload: str) -> Row | None:
        found = _get(rows, role, workload)
        return found[0] if found else None

    def best_peer(workloads: tuple[str, ...]) -> Row | None:
        peers = [r for w in workloads for r in _get(rows, "peer", w)]
        return max(peers, key=lambda r: r.requests_per_s, default=None)

    def rival(workload: str) -> Row | None:
        """Triton's row where it ran (the peer the targets name), else the best peer's."""
        found = [r for r in _get(rows, "peer", workload) if r.server == TRITON]
        return found[0] if found else best_peer((workload,))

    me, asgi, peer = one("subject", "W1-c32"), one("asgi", "W1-c32"), rival("W1-c32")
    target = "W1 c32 >= 1.5x Triton and >= 0.5x the bare-ASGI floor"
    if me is None or asgi is None or peer is None:
        record(target, None, "needs bn-serve, asgi-floor and a peer on W1-c32")
    else:
        vs_peer, vs_asgi = me.requests_per_s / peer.requests_per_s, me.requests_per_s / asgi.requests_per_s
        record(
            target,
            vs_peer >= 1.5 and vs_asgi >= 0.5,
            f"{vs_peer:.2f}x {peer.server}, {vs_asgi:.2f}x asgi-floor",
        )
    me, wire, peer = one("subject", "W3-binary"), one("wire", "W3-binary"), rival("W3-binary")
    target = "W3 binary >= 2x Triton and p50 within 1.5x loopback"
    if me is None or wire is None or peer is None:
        record(target, None, "needs bn-serve, loopback and a peer on W3-binary")
    else:
        vs_wire, vs_peer = me.p50_ms / wire.p50_ms, me.requests_per_s / peer.requests_per_s
        record(
            target,
            vs_wire <= 1.5 and vs_peer >= 2.0,
            f"{vs_peer:.2f}x {peer.server}, p50 {vs_wire:.2f}x loopback",
        )
    me, peer, naive = one("subject", "W1-c1"), rival("W1-c1"), one("baseline", "W1-c1")
    target = "W1 c1 p50 and p99 <= Triton's and the naive route's"
    others = [r for r in (peer, naive) if r is not None]
    if me is None or not others:
        record(target, None, "needs bn-serve and a peer or the baseline on W1-c1")
    else:
        met = all(me.p50_ms <= r.p50_ms and me.p99_ms <= r.p99_ms for r in others)
        detail = "; ".join(f"{r.server} {r.p50_ms:.2f} / {r.p99_ms:.2f} ms" for r in others)
        record(target, met, f"p50 / p99 {me.p50_ms:.2f} / {me.p99_ms:.2f} ms vs {detail}")
    memory: dict[str, float] = {}
    for r in rows:
        if r.status == "ok" and r.role in ("peer", "subject"):
            memory[r.server] = max(memory.get(r.server, 0.0), r.rss_mib)
    peer_memory = {s: m for s, m in memory.items() if any(r.server == s and r.role == "peer" for r in rows)}
    if not subject or not peer_memory:
        record("peak RSS <= leanest peer's", None, "needs bn-serve and a peer")
    else:
        leanest = min(peer_memory, key=lambda s: peer_memory[s])
        mine = memory[subject[0].server]
        record(
            "peak RSS <= leanest peer's",
            mine <= peer_memory[leanest],
            f"{mine:.0f} MiB vs {peer_memory[leanest]:.0f} MiB ({leanest})",
        )
    return out


def document(rows: Sequence[Row], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON results: run metadata, every row with its ratios, the targets. NaN becomes null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return {"meta": meta, "rows": [clean(asdict(r)) for r in rows], "targets": targets(rows)}
