"""Benchmark suites (run by benchmarks/run.py, `make bench`; never by `make test`)."""

from benchmarks import harness


def pytest_configure(config):
    harness.configure()
