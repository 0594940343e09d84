"""Serving benchmark: bn-serve against a naive baseline, the framework floor, loopback and the peers.

    python benchmarks/serve.py [--peers] [--duration 10] [--workloads W1,W2,W3] [--out results.json]
    python benchmarks/serve.py --grpc [--duration 10]   # W1, W3 over gRPC: benchmarks/serving/grpc_bench.py

See benchmarks/README.md ("Serving") for what each workload and server is, and benchmarks/serving/ for parts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, the repository root is not on the path; put it there so `benchmarks.serving` imports.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if "--grpc" in sys.argv[1:]:
        from benchmarks.serving.grpc_bench import main
    else:
        from benchmarks.serving.harness import main

    sys.exit(main())
