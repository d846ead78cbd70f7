"""Benchmarks: measured speed numbers (never timed assertions). Run e.g. `python -m benchmarks.sharing`."""
