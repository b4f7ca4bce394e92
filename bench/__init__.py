"""Benchmarks. Each prints one JSON object with ``--json``; results are recorded in docs/benchmarks.md."""
