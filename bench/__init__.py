"""Benchmarks of the attention primitives and of one metagradient round.

A package (not loose files) so that `bench/conftest.py` and `tests/conftest.py`
can be collected in one pytest session without a module-name clash.
"""
