"""The project's own benchmarks (not shipped in the wheel): ``python -m benchmarks.run --help``."""
