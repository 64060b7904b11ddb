"""The benchmark harness behind ``alpa-py bench`` and ``benchmarks/``."""
