"""pytest-benchmark suites: run with ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md).

They live outside ``tests/`` (the project's ``testpaths``), so ``python -m pytest`` never collects them.
"""

import pytest


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="needs pytest-benchmark (pip install pytest-benchmark)")
    for item in items:
        item.add_marker(skip)
