"""A bounded budget of response bytes waiting on their clients, and the sending of a body in slices.

An encoded response lives in memory until its client has taken it. A client that does not read keeps it
there; many such clients would keep as many responses. So every infer response reserves its size from one
`ResponseBudget` per process (`max_pending_response_bytes`) before it is sent, and gives it back only once
its last byte has been handed to the transport. A response that does not fit is refused (503 with
`Retry-After`, counted in `bn_serve_responses_refused_total`) and its bytes freed at once.

`body_messages` cuts a body into `SEND_SLICE_BYTES` slices: uvicorn waits for its write buffer to drain
below its high-water mark before each message, so the transport never holds more than about one slice of
a response while the rest waits here, counted in the budget. A client that leaves the buffer full past
`send_timeout_s` is cut off by the protocol (`service.http_limits`), which frees the slice and ends the
wait.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.errors import Overloaded

SEND_SLICE_BYTES = 1 << 20
_NAMESPACE = "bn_serve"


class ResponseBudget:
    """At most `capacity` bytes of responses reserved at once; used from the event loop's thread."""

    def __init__(
        self, capacity: int, registry: CollectorRegistry | None = None, retry_after_s: int = 1
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.pending = 0
        self._refused = Counter(
            "responses_refused",
            "Infer responses refused because the responses still waiting on slow clients held "
            "max_pending_response_bytes.",
            namespace=_NAMESPACE,
            registry=registry,
        )
        self._pending = Gauge(
            "pending_response_bytes",
            "Bytes of infer responses encoded and not yet handed to the transport.",
            namespace=_NAMESPACE,
            multiprocess_mode="livesum",
            registry=registry,
        )

    def take(self, size: int) -> None:
        """Hold `size` bytes until `give_back(size)`; raises `Overloaded` (and counts it) when they do not
        fit. Two plain calls rather than a context manager: this runs once per infer request."""
        if self.pending + size > self.capacity:
            self._refused.inc()
            raise Overloaded(
                f"the server holds {self.pending} bytes of responses not yet read by their clients and this "
                f"one has {size} (max_pending_response_bytes is {self.capacity}); retry after "
                f"{self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        self.pending += size

    def check(self, size: int) -> None:
        """Refuse (as `take`) a response of `size` bytes that would not fit, holding nothing: for a response
        handed to the transport at once, with no wait between reserving and releasing its bytes."""
        if self.pending + size > self.capacity:
            self.take(size)  # raises and counts the refusal

    def give_back(self, size: int) -> None:
        """Release `size` bytes held by `take`."""
        self.pending -= size

    def export(self) -> None:
        """Set `bn_serve_pending_response_bytes` to the bytes held now. Called by the metrics' flush
        (`ServiceMetrics.on_flush`) rather than on every change: a gauge's `set` takes a lock."""
        self._pending.set(self.pending)


def body_slices(
    parts: tuple[bytes | memoryview, ...], size: int = SEND_SLICE_BYTES
) -> Iterator[bytes | memoryview]:
    """`parts` cut into views of at most `size` bytes each (no copies), in order."""
    for part in parts:
        if len(part) <= size:
            yield part
            continue
        view = memoryview(part)
        for start in range(0, len(view), size):
            yield view[start : start + size]
