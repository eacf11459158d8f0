"""pyflow benchmarks: `make bench` (python -m bench). Results: docs/benchmarks.md."""
