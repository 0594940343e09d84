"""`benchmarks/grpc_hot_path.py` drives the real gRPC handler: it checks its answer against the model's
formula before counting anything, so a run that prints figures served right answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_grpc_hot_path_driver_serves_right_answers_and_counts_calls() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpc_hot_path.py"), "--calls", "64", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=ROOT,
    )
    counts = re.search(r"calls per call: (\d+) Python, (\d+) C", done.stdout)
    assert counts is not None, done.stdout + done.stderr
    assert int(counts[1]) > 0
    assert int(counts[2]) > 0
