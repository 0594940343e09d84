"""`bn-serve`: placeholder until the service lands."""

from __future__ import annotations


def main() -> int:
    raise SystemExit("bn-serve: not yet available")
