"""Shared pytest setup: markers used across test modules."""


def pytest_configure(config):
    # Tests that load real models (e.g. the GGUF target); deselect with -m "not slow".
    config.addinivalue_line("markers", "slow: loads a real model; deselect with -m 'not slow'")
