"""A few seconds of the soak benchmark (`benchmarks/soak.py`) against its own real `bn-serve`: mixed valid
and invalid requests over several connections, every status the expected one, memory not running away."""

from __future__ import annotations

import pytest

from benchmarks.soak import own_server, soak

pytestmark = pytest.mark.slow


def test_a_short_soak_has_no_unexpected_status_and_no_runaway_memory() -> None:
    with own_server() as (url, pid):
        report = soak(url, connections=4, duration_s=3.0, warmup_s=1.0, server_pid=pid)
    assert report.requests > 100
    assert report.unexpected == {}
    assert report.transport_errors == {}
    assert {"200", "400", "404", "405"} <= set(report.statuses)
    # Slow senders and slow readers ran beside the mix and got complete 200 answers.
    assert {"slow_sender:200", "slow_reader:200"} <= set(report.slow_requests), report.table()
    assert report.rss_growth is not None
    assert report.rss_growth < 0.25, report.table()  # the 10-minute figure (README) is the real target


def test_the_soak_counts_a_status_it_did_not_expect() -> None:
    # A server that wants a token answers 401 to everything: the soak must call that unexpected.
    key = "soak-key"
    with own_server({"BN_SERVE_API_KEY": key}) as (url, _):
        refused = soak(url, connections=2, duration_s=1.0, warmup_s=0)
        accepted = soak(url, connections=2, duration_s=1.0, warmup_s=0, token=key)
    assert refused.unexpected
    assert not refused.ok
    assert accepted.ok, accepted.table()
