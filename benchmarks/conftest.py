"""Benchmarks live in bench_*.py (kept out of `pytest tests`); the `gpu` marker tags the full-size cases."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: full-size case, meant for a CUDA device (deselect with -m 'not gpu')")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
