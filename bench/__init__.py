"""Benchmarks of the detector on this machine: ``python -m bench.run`` (``make bench``); see BENCHMARKS.md."""
