"""Benchmarks and GPU checks: each prints its ratios measured in one run and writes JSON."""
