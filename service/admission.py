"""Admission control: a bounded number of inference requests at once, and a deadline for each.

A request's body arrives first, holding a place among the uploads (`max_uploading_requests`), not an
inference place: a client that sends its body slowly (by accident or as slowloris) cannot keep others
from being served. Once the body is in, the request takes one inference place until it is answered, so the
requests queued or running never exceed `inference_threads + max_queued_requests`, whatever the clients do.
Past either limit, requests are refused at once with `Overloaded` (503 and `Retry-After`) instead of
queueing without bound. Every request also has one deadline, `request_timeout_s` after its arrival, which
covers both stages (its body's reading included): past it the client gets `RequestTimeout` (504) and the
place is given back; a run that has not started yet is skipped rather than computed for nobody, one
already in a thread finishes there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

from service.errors import Overloaded, RequestTimeout

T = TypeVar("T")


class AdmissionGate:
    """Counts admitted requests against `capacity`; used from the event loop's thread only."""

    def __init__(
        self,
        capacity: int,
        retry_after_s: int = 1,
        what: str = "requests running or queued: inference_threads + max_queued_requests",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.what = what
        self.admitted = 0

    def enter(self) -> None:
        """Take a place; raises `Overloaded` when all `capacity` places are taken."""
        if self.admitted >= self.capacity:
            raise Overloaded(
                f"the server is at capacity ({self.capacity} {self.what}); retry after {self.retry_after_s}s",
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


class Admission:
    """A place in `gate` and a deadline `timeout_s` away, taken per request by `admit()`.

    `with admission.admit(): ...` inside a task: raises `Overloaded` at once when the gate is full; when the
    deadline passes first, the task is cancelled at the await it is suspended on and the block raises
    `RequestTimeout`. The deadlines are watched by one timer for all requests (`_Deadlines`), so a request
    that finishes in time pays for no extra task (as `asyncio.wait_for` would create), no await, and no
    timer of its own to push onto the event loop's heap and cancel.
    Work the cancelled await stood for goes on (a run in a thread finishes), and a request still queued for
    a batch is skipped by the batcher, its future being cancelled.
    """

    def __init__(self, gate: AdmissionGate, timeout_s: float, uploads: AdmissionGate | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.gate = gate
        self.timeout_s = timeout_s
        self.uploads = uploads
        self.deadlines = _Deadlines()

    def admit(self, arrived_at: float | None = None) -> Admitted:
        """The context of one request: enter it from the task that serves the request. Its deadline is
        `timeout_s` after `arrived_at` (the event loop's clock), or after entering when None."""
        return Admitted(self, self.gate, arrived_at)

    def receiving(self, arrived_at: float) -> Admitted:
        """The context of reading one request's body: a place among the uploads (none when there is no
        `uploads` gate) and the same deadline as `admit(arrived_at)`."""
        return Admitted(self, self.uploads, arrived_at)


class _Deadlines:
    """The deadlines of one admission's requests in flight, in the order they fall due, behind one timer.

    Every request's deadline is the same `timeout_s` after its arrival, and requests enter in the order
    they arrive, so their deadlines come in order: one timer, armed for the earliest deadline of a request
    in flight, serves them all. A request that finishes is only marked done (and dropped once it is the
    earliest); when the timer fires it drops the done ones, expires those past due and re-arms for the next.
    A deadline out of order (an `arrived_at` older than one already watched) gets a timer of its own.
    Used from the event loop's thread only.
    """

    __slots__ = ("_due", "_loop", "_timer")

    def __init__(self) -> None:
        self._due: deque[Admitted] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, admitted: Admitted, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        """Watch `admitted`'s deadline; returns the timer of its own when it is out of order."""
        if loop is not self._loop:  # another event loop than the last request's: the old one's are gone
            self._due.clear()
            self._loop, self._timer = loop, None
        due = self._due
        if due and admitted.due_at < due[-1].due_at:
            return loop.call_at(admitted.due_at, admitted.expire)
        due.append(admitted)
        if self._timer is None:
            self._timer = loop.call_at(admitted.due_at, self._fire)
        return None

    def finished(self) -> None:
        """Drop the done requests that fall due first (the others go when the timer reaches them)."""
        due = self._due
        while due and due[0].done:
            due.popleft()

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        due = self._due
        while due:
            head = due[0]
            if not head.done:
                if head.due_at > now:
                    self._timer = loop.call_at(head.due_at, self._fire)
                    return
                head.expire()
            due.popleft()


class Admitted:
    """One request's place and deadline; see `Admission`."""

    __slots__ = ("_admission", "_arrived_at", "_expired", "_gate", "_task", "_timer", "done", "due_at")

    def __init__(self, admission: Admission, gate: AdmissionGate | None, arrived_at: float | None) -> None:
        self._admission = admission
        self._gate = gate
        self._arrived_at = arrived_at
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None  # its own, for a deadline out of order only
        self.due_at = 0.0  # on the event loop's clock, once entered
        self.done = False

    def __enter__(self) -> Admitted:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("admission is taken inside a task on a running event loop")
        loop = asyncio.get_running_loop()
        start = loop.time() if self._arrived_at is None else self._arrived_at
        if self._gate is not None:
            self._gate.enter()
        self._task = task
        self.due_at = start + self._admission.timeout_s
        self._timer = self._admission.deadlines.add(self, loop)
        return self

    def admit(self) -> None:
        """Trade the upload place held since `receiving` for an inference place, under the same deadline
        (a second deadline per request would cost the event loop's timers at high concurrency).
        Raises `Overloaded` when every inference place is taken; the upload place is given back first."""
        if self._gate is not None:
            self._gate.leave()
            self._gate = None
        inference = self._admission.gate
        inference.enter()
        self._gate = inference

    def expire(self) -> None:
        """The deadline passed: cancel the request's task (its `__exit__` makes that the 504)."""
        if self.done:
            return
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
        else:
            self._admission.deadlines.finished()
        if self._gate is not None:
            self._gate.leave()
        task, self._task = self._task, None  # a done request waiting in `_Deadlines` holds no task
        if not self._expired or task is None:
            return
        # Our own cancellation becomes the 504; one from elsewhere (shutdown, a caller's timeout) stays one.
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+; 3.10 counts no cancellations
        others = uncancel() if uncancel is not None else 0
        if exc_type is asyncio.CancelledError and others == 0:
            raise Deadline(self._admission.timeout_s).error() from None
