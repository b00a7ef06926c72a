"""The parts, report and plots of `python -m benchmarks.run`, one module each."""
