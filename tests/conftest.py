"""Shared pytest configuration: the ``gpu`` marker and small helpers used across the suite."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run Triton kernels on CPU tensors through the interpreter (set before the kernels are launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
