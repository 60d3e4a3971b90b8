"""Benchmarks and chaos runs for vram-llm: `python -m bench` (see docs/benchmarks.md)."""
