"""Shared by the course's tests (run them with `python -m course test NAME`). The tiny random models
are the project's own (tests/conftest.py: tiny_classifier)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (tests/conftest.py says why)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
