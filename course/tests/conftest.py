"""Shared by the course's tests (run them with `python -m course test NAME`). The tiny random models,
the tiny model folder and the test corpus are the project's own (tests/conftest.py)."""

import pytest
import torch

from tests.conftest import data_dir, default_tokenizer, each_tokenizer_read_once, tiny_model_dir  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n): what the test is worth when graded (python -m course grade; "
                                       "1 without the mark)")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (tests/conftest.py says why)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
