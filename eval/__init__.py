"""Evaluation jobs and benchmarks."""
