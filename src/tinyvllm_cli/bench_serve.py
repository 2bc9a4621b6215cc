"""Kept until tests/test_serve.py imports `bench_serve` from tinyvllm_cli.bench; then delete this file."""

from tinyvllm_cli.bench import bench_serve  # noqa: F401
