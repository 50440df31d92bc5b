"""Benchmarks: each script prints its ratio against a reference measured in the same run
and records it in bench/RESULTS.md."""
