"""Admission control: a bounded number of inference requests at once, and a deadline for each.

A request holds one place from its arrival until its inference run has finished (not merely until its
client stopped waiting), so the work queued behind the inference threads never exceeds
`inference_threads + max_queued_requests` requests, whatever the clients do. Past that, requests are
refused at once with `Overloaded` (503 and `Retry-After`) instead of queueing without bound. Every request
also has a deadline, `request_timeout_s` after its arrival: past it the client gets `RequestTimeout` (504),
and a run that has not started yet is skipped rather than computed for nobody.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from service.errors import Overloaded, RequestTimeout

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class AdmissionGate:
    """Counts admitted requests against `capacity`; used from the event loop's thread only."""

    def __init__(self, capacity: int, retry_after_s: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.admitted = 0

    def enter(self) -> None:
        """Take a place; raises `Overloaded` when all `capacity` places are taken."""
        if self.admitted >= self.capacity:
            raise Overloaded(
                f"the server is at capacity ({self.capacity} requests running or queued: inference_threads "
                f"+ max_queued_requests); retry after {self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1


class Deadline:
    """`timeout_s` from now on the monotonic clock."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        """Raise `RequestTimeout` when the deadline has passed."""
        if self.remaining() <= 0:
            raise self.error()

    def error(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request did not finish within {self.timeout_s:g}s (request_timeout_s); "
            "the server is busy or the request is too large"
        )

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, or `RequestTimeout` when the deadline passes first.

        A future is shielded: the work it stands for is not cancelled, only no longer awaited.
        """
        remaining = self.remaining()
        if remaining <= 0:
            raise self.error()
        target = asyncio.shield(awaitable) if isinstance(awaitable, asyncio.Future) else awaitable
        try:
            return await asyncio.wait_for(target, remaining)
        except asyncio.TimeoutError:
            raise self.error() from None


def admission_control(
    gate: AdmissionGate, timeout_s: float
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """A decorator for an async route: a place in `gate` while it runs, and a deadline `timeout_s` after
    the request's arrival (`RequestTimeout`; the route is cancelled, work already in a thread finishes)."""

    def decorate(route: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(route)
        async def admitted(*args: P.args, **kwargs: P.kwargs) -> R:
            deadline = Deadline(timeout_s)
            gate.enter()
            try:
                return await deadline.wait(route(*args, **kwargs))
            finally:
                gate.leave()

        return admitted

    return decorate
