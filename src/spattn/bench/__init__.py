"""Benchmarks: a registry of rows plus one driver; results are JSON with machine, versions and commit."""
