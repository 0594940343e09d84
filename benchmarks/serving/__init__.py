"""The serving benchmark's parts: models, request bodies, servers under test, load generator, report.

`benchmarks/serve.py` is the one command; each module here holds one of its jobs.
"""
