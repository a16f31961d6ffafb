"""Benchmark harness (make bench)."""
