"""Benchmarks of the Tollbooth gateway. `python -m bench.gateway` runs the comparison."""
