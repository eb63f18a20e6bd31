"""Each ablation and method flag of meta_pretrain.py does what it says, seen from outside: a
copy of the CLI that ignored the flag fails here. One meta-step on a tiny model, with the
project's own functions wrapped to record what they were given."""
import pytest
import torch
from conftest import prime_argv

import adapters
import maml
import meta_pretrain
from plumbing.batches import encode_sentences
from plumbing.ner_data import load_wikiann
from plumbing.pretrained import load_tokenizer


def prime(model_dir, data_dir, out, *flags):
    meta_pretrain.main(prime_argv(model_dir, data_dir, out, "--steps", "1", "--inner-steps", "1", "--eval-every", "0",
                                  *flags))


@pytest.fixture
def record(monkeypatch):
    """Wraps maml.meta_step, maml.inner_loop, maml.functional_loss and meta_pretrain.mtl_gradient."""
    seen = {"meta_step": [], "inner_fast": [], "mtl": 0, "peft_grads": []}
    real_step, real_inner, real_loss, real_mtl = maml.meta_step, maml.inner_loop, maml.functional_loss, \
        meta_pretrain.mtl_gradient

    def functional_loss(model):
        seen["model"] = model
        return real_loss(model)

    def meta_step(loss_fn, tasks, init_fast, steps, lr, **kwargs):
        seen["meta_step"].append({"tasks": tasks, "autocast": torch.is_autocast_enabled("cpu"), **kwargs})
        result = real_step(loss_fn, tasks, init_fast, steps, lr, **kwargs)
        seen["peft_grads"].append({n: p.grad is not None for n, p in adapters.peft_parameters(seen["model"]).items()})
        return result

    def inner_loop(loss_fn, fast, *args, **kwargs):
        seen["inner_fast"].append(sorted(fast))
        return real_inner(loss_fn, fast, *args, **kwargs)

    def mtl_gradient(model, tasks):
        seen["mtl"] += 1
        return real_mtl(model, tasks)
    monkeypatch.setattr(maml, "meta_step", meta_step)
    monkeypatch.setattr(maml, "inner_loop", inner_loop)
    monkeypatch.setattr(maml, "functional_loss", functional_loss)
    monkeypatch.setattr(meta_pretrain, "mtl_gradient", mtl_gradient)
    return seen


def sentences_of(model_dir, data_dir, lang):
    """The token-id rows of a language's first train sentences, to recognise a batch's language."""
    examples = encode_sentences(load_wikiann(lang, "train", data_dir, 40), load_tokenizer(model_dir), 32)
    return {tuple(e["input_ids"]) for e in examples}


def batch_rows(batch):
    return {tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])}


@pytest.mark.parametrize("query, query_langs", [("cross", ["de", "es"]), ("same", ["en"])])
def test_query_flag_chooses_the_query_language(tiny_model_dir, data_dir, tmp_path, record, query, query_langs):
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--query", query)
    allowed = set().union(*(sentences_of(tiny_model_dir, data_dir, lang) for lang in query_langs))
    english = sentences_of(tiny_model_dir, data_dir, "en")
    for support, query_batch in record["meta_step"][0]["tasks"]:
        assert batch_rows(support) <= english                 # support: always the source language
        assert batch_rows(query_batch) <= allowed


@pytest.mark.parametrize("inner_params", ["peft", "all"])
def test_inner_params_flag_chooses_the_fast_tensors(tiny_model_dir, data_dir, tmp_path, record, inner_params):
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--inner-params", inner_params)
    model = record["model"]
    peft = set(adapters.peft_parameters(model))
    trainable_body = {n for n, p in adapters.body_parameters(model).items() if p.requires_grad}
    fast = set(record["inner_fast"][0])
    assert fast == (peft | trainable_body if inner_params == "all" else peft)
    assert trainable_body and "bert.embeddings.word_embeddings.weight" not in fast   # frozen by default


@pytest.mark.parametrize("outer_peft", [False, True])
def test_outer_peft_flag_sends_the_meta_gradient_into_the_initial_peft(tiny_model_dir, data_dir, tmp_path, record,
                                                                       outer_peft):
    prime(tiny_model_dir, data_dir, tmp_path / "p", *(["--outer-peft"] if outer_peft else []))
    grads = record["peft_grads"][0]
    assert all(grads.values()) if outer_peft else not any(grads.values())


@pytest.mark.parametrize("first_order", [False, True])
def test_first_order_flag_drops_the_second_order_term(tiny_model_dir, data_dir, tmp_path, record, first_order):
    prime(tiny_model_dir, data_dir, tmp_path / "p", *(["--first-order"] if first_order else []))
    assert record["meta_step"][0]["first_order"] is first_order


def test_second_order_term_is_present_by_default(tiny_model_dir, data_dir, tmp_path, record):
    """The default meta-gradient differs from the first-order one on the same tasks and phi_0."""
    prime(tiny_model_dir, data_dir, tmp_path / "p")
    model, call = record["model"], record["meta_step"][0]
    loss_fn = maml.functional_loss(model)
    phi = adapters.fresh_peft_tensors(model, torch.Generator().manual_seed(0))
    body = [p for p in adapters.body_parameters(model).values() if p.requires_grad]
    grads = []
    for first_order in (call["first_order"], True):
        model.zero_grad(set_to_none=True)
        maml.meta_step(loss_fn, call["tasks"],
                       lambda i: {n: t.detach().clone().requires_grad_() for n, t in phi.items()},
                       1, 0.5, first_order=first_order)
        grads.append(torch.cat([p.grad.flatten() for p in body]))
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("method", ["maml", "mtl"])
def test_method_flag_chooses_meta_learning_or_multi_task(tiny_model_dir, data_dir, tmp_path, record, method):
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--method", method)
    assert (len(record["meta_step"]), record["mtl"]) == ((1, 0) if method == "maml" else (0, 1))
    peft_trains = all(p.requires_grad for p in adapters.peft_parameters(record["model"]).values())
    assert peft_trains is (method == "mtl")


def test_meta_sgd_rates_move_are_logged_and_resume(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import json
    flags = ["--meta-sgd", "--meta-sgd-lr", "0.01", "--inner-lr", "0.1", "--steps", "3", "--save-every", "1"]
    prime(tiny_model_dir, data_dir, tmp_path / "whole", *flags)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all("inner_lr_mean" in line for line in lines)
    assert lines[-1]["inner_lr_max"] - lines[-1]["inner_lr_min"] > 1e-3 and lines[-1]["inner_lr_max"] != 0.1
    rates = json.loads((tmp_path / "whole" / "run.json").read_text())["meta_sgd_rates"]
    assert len(rates) > 2 and len(set(rates.values())) > 1         # one learned rate per fast tensor
    real, calls = maml.meta_step, []

    def cut(*a, **k):                                               # Ctrl-C in the third meta-step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(maml, "meta_step", cut)
    with pytest.raises(KeyboardInterrupt):
        prime(tiny_model_dir, data_dir, tmp_path / "cut", *flags)
    monkeypatch.setattr(maml, "meta_step", real)
    prime(tiny_model_dir, data_dir, tmp_path / "cut", *flags, "--resume")
    resumed = json.loads((tmp_path / "cut" / "run.json").read_text())["meta_sgd_rates"]
    assert resumed == pytest.approx(rates, rel=1e-6)               # restored from resume.pt, not restarted


def test_meta_sgd_is_a_maml_option(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="--meta-sgd is a MAML option"):
        prime(tiny_model_dir, data_dir, tmp_path / "p", "--meta-sgd", "--method", "mtl")


def test_max_tokens_and_precision_reach_priming(tiny_model_dir, data_dir, tmp_path, record):
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--max-tokens", "40", "--precision", "bf16")
    call = record["meta_step"][0]
    assert call["autocast"]
    for support, query in call["tasks"]:
        for batch in (support, query):
            assert batch["input_ids"].numel() <= 40 or len(batch["input_ids"]) == 1   # one long sentence may exceed


def test_fp32_is_the_default_precision(tiny_model_dir, data_dir, tmp_path, record):
    prime(tiny_model_dir, data_dir, tmp_path / "p")
    assert not record["meta_step"][0]["autocast"]


def test_max_tokens_and_precision_reach_fine_tuning(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import finetune_peft
    from plumbing.batches import BatchStream
    seen = []
    real = BatchStream.next_batch

    def next_batch(self):
        batch = real(self)
        seen.append((batch["input_ids"].numel(), len(batch["input_ids"]), torch.is_autocast_enabled("cpu")))
        return batch
    monkeypatch.setattr(BatchStream, "next_batch", next_batch)
    finetune_peft.main(["--init", str(tiny_model_dir), "--data-dir", data_dir, "--out", str(tmp_path / "ft"),
                        "--steps", "3", "--batch-size", "8", "--max-sentences", "40", "--dev-sentences", "8",
                        "--max-len", "32", "--max-tokens", "50", "--precision", "bf16"])
    assert all((tokens <= 50 or rows == 1) and autocast for tokens, rows, autocast in seen)


def test_log_adaptation_every_skips_the_extra_forward(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import json
    calls = []
    real = maml.meta_step
    monkeypatch.setattr(maml, "meta_step", lambda *a, **k: calls.append(k["measure_after"]) or real(*a, **k))
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--steps", "4", "--log-adaptation-every", "2")
    assert calls == [False, True, False, True]
    lines = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert ["support_loss_after" in line for line in lines] == [False, True, False, True]


def test_peft_shape_flags_reach_the_config():
    args = meta_pretrain.build_parser().parse_args(
        ["--adapter-placement", "pfeiffer", "--adapter-non-linearity", "gelu", "--adapter-init", "bert",
         "--reduction-factor", "8", "--prefix-length", "4", "--lora-rank", "2"])
    config = meta_pretrain.check_args(args)
    assert (config.placement, config.adapter_non_linearity, config.adapter_init, config.reduction_factor,
            config.prefix_length, config.lora_rank) == ("pfeiffer", "gelu", "bert", 8, 4, 2)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_resume_flag(tiny_model_dir, data_dir, tmp_path, keep):
    prime(tiny_model_dir, data_dir, tmp_path / "p", "--keep-resume" if keep else "--no-keep-resume")
    assert (tmp_path / "p" / "resume.pt").is_file() is keep
