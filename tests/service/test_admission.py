"""`Admission.admit()`: a place in the gate and a deadline armed as one timer, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import Admission, AdmissionGate
from service.errors import Overloaded, RequestTimeout


def test_work_past_the_deadline_raises_request_timeout_and_gives_the_place_back() -> None:
    async def scenario() -> tuple[float, int]:
        admission = Admission(AdmissionGate(1), timeout_s=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout, match="request_timeout_s"), admission.admit():
            await asyncio.sleep(10)
        return loop.time() - started, admission.gate.admitted

    elapsed, admitted = asyncio.run(scenario())
    assert 0.04 <= elapsed < 1.0
    assert admitted == 0


def test_work_done_in_time_is_never_cancelled_afterwards() -> None:
    async def scenario() -> tuple[str, int]:
        admission = Admission(AdmissionGate(1), timeout_s=0.05)
        with admission.admit():
            result = "answered"
        # Past the deadline, outside the block: a timer left armed would cancel this sleep.
        await asyncio.sleep(0.15)
        return result, admission.gate.admitted

    assert asyncio.run(scenario()) == ("answered", 0)


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def scenario() -> tuple[bool, int]:
        admission = Admission(AdmissionGate(1), timeout_s=30)

        async def request() -> None:
            with admission.admit():
                await asyncio.sleep(10)

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        task.cancel()  # a client gone, or the server shutting down: not a 504
        try:
            await task
        except asyncio.CancelledError:
            return True, admission.gate.admitted
        return False, admission.gate.admitted

    assert asyncio.run(scenario()) == (True, 0)


def test_the_task_is_no_longer_cancelling_after_its_timeout() -> None:
    async def scenario() -> tuple[int, str]:
        admission = Admission(AdmissionGate(1), timeout_s=0.02)
        try:
            with admission.admit():
                await asyncio.sleep(10)
        except RequestTimeout:
            pass
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0)  # a pending cancellation would raise here
        return task.cancelling(), "went on"

    assert asyncio.run(scenario()) == (0, "went on")


def test_a_full_gate_refuses_before_any_timer_is_armed() -> None:
    async def scenario() -> int:
        admission = Admission(AdmissionGate(1, retry_after_s=2), timeout_s=0.02)
        with admission.admit():
            with pytest.raises(Overloaded) as refused, admission.admit():
                pass
            assert refused.value.retry_after_s == 2
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # no stray timer of the refused request cancels this task
        return admission.gate.admitted

    assert asyncio.run(scenario()) == 0


def test_a_deadline_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        Admission(AdmissionGate(1), timeout_s=0)


def test_one_timer_expires_each_request_at_its_own_deadline_and_never_a_finished_one() -> None:
    # Requests overlapping in time, finishing before or after their deadlines (0.3 s each) in any order,
    # and one whose arrival predates the others' (its deadline falls before theirs): each slow one times out
    # once its own deadline has passed, not before and not long after; a fast one is never cancelled.
    timeout_s = 0.3

    async def scenario() -> dict[str, tuple[str, float]]:
        admission = Admission(AdmissionGate(10), timeout_s=timeout_s)
        loop = asyncio.get_running_loop()
        outcomes: dict[str, tuple[str, float]] = {}

        async def request(name: str, work_s: float, arrived_at: float | None = None) -> None:
            started = loop.time() if arrived_at is None else arrived_at
            try:
                with admission.admit(arrived_at):
                    await asyncio.sleep(work_s)
                outcomes[name] = ("answered", loop.time() - started)
            except RequestTimeout:
                outcomes[name] = ("timed out", loop.time() - started)

        tasks = [asyncio.ensure_future(request("slow first", 10))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(request("fast", 0.01)))
        tasks.append(asyncio.ensure_future(request("slow second", 10)))
        tasks.append(asyncio.ensure_future(request("arrived earlier", 10, loop.time() - 0.25)))
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(request("fast after", 0.1)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(timeout_s)  # past every deadline: nothing left armed cancels this task
        assert admission.gate.admitted == 0
        return outcomes

    outcomes = asyncio.run(scenario())
    assert {name: outcome for name, (outcome, _) in outcomes.items()} == {
        "slow first": "timed out",
        "fast": "answered",
        "slow second": "timed out",
        "arrived earlier": "timed out",
        "fast after": "answered",
    }
    for name in ("slow first", "slow second", "arrived earlier"):
        assert timeout_s <= outcomes[name][1] < timeout_s + 0.15, (name, outcomes[name])
