"""Priming episodes (METHOD.md, "One priming episode"): where support and query batches come
from, and the held-out episode that meta-validation scores.

    source = EpisodeSource(tokenizer, "en", query_languages("en", ["de", "es"], "cross"), data_dir, ...)
    support, query = source.sample(n_tasks=2, generator=task_rng)[0]
    held_out = held_out_episode(tokenizer, "en", ["de", "es"], data_dir, ...)
    held_out_losses(model, held_out, loss_fn, maml.InnerLoop(steps=3, lr=0.1))
    adapted_losses(held_out, loss_fn, fresh, adapted, reference_loss)   # score a given phi (the implicit loop's)

  support batch  source-language train sentences: what downstream PEFT fine-tuning will see.
  query batch    train sentences of a priming language, drawn uniformly per task, so the
                 meta-gradient asks for a body whose PEFT adaptation transfers across
                 languages; with --query same the source language itself (the ablation).
                 `query_languages` is the one place that decides which.
The held-out episode is fixed: one source-language dev batch to adapt fresh PEFT tensors on,
and priming-language dev batches to score them, the same for every ablation (--query same
included), so their curves compare.
"""

import torch

from plumbing import peft_state
from plumbing.ner_data import BatchStream, encode_sentences, load_wikiann
from plumbing.runs import derive_seed


def query_languages(source_lang, priming_langs, query):
    """The languages of query batches: the priming languages (cross-lingual, the paper) or,
    for the --query same ablation, the source language."""
    # BEGIN ASSIGNMENT episode
    if query not in ("cross", "same"):
        raise ValueError(f"query must be 'cross' or 'same', got {query!r}")
    return list(priming_langs) if query == "cross" else [source_lang]
    # END ASSIGNMENT episode


def batch_stream(tokenizer, lang, split, data_dir, max_sentences, batch_size, max_len, seed, device, max_tokens=None,
                 fmt=None):
    """An endless seeded stream of padded batches of one language and split (fmt: ner_data.load_wikiann's)."""
    data = load_wikiann(lang, split, data_dir, max_sentences, fmt)
    return BatchStream(encode_sentences(data, tokenizer, max_len), batch_size, seed=seed,
                       pad_id=tokenizer.pad_token_id, device=device, max_tokens=max_tokens)


class EpisodeSource:
    """Support batches from the source language, query batches from the query languages; each
    stream has its own seed derived from the run's seed, so resuming restores each one."""

    def __init__(self, tokenizer, source_lang, query_langs, data_dir, max_sentences, batch_size, max_len, seed,
                 device="cpu", max_tokens=None, fmt=None, fine_tune_batch_size=None):
        def stream(lang, role, size=batch_size):
            return batch_stream(tokenizer, lang, "train", data_dir, max_sentences, size, max_len,
                                derive_seed(seed, f"{role} stream {lang}"), device, max_tokens, fmt)
        self.support = stream(source_lang, "support")
        self.query = {lang: stream(lang, "query") for lang in query_langs}
        # the implicit inner loop's fine-tuning batches (source language, their own size and seed)
        self.fine_tune = stream(source_lang, "fine-tuning", fine_tune_batch_size) if fine_tune_batch_size else None

    def fine_tune_batches(self):
        """The endless stream of fine-tuning batches (implicit inner loop)."""
        while True:
            yield self.fine_tune.next_batch()

    def sample(self, n_tasks, generator):
        """n (support, query) batch pairs; each task's query language is drawn uniformly."""
        # BEGIN ASSIGNMENT episode
        langs = list(self.query)
        tasks = []
        for _ in range(n_tasks):
            lang = langs[torch.randint(len(langs), (1,), generator=generator).item()]
            tasks.append((self.support.next_batch(), self.query[lang].next_batch()))
        return tasks
        # END ASSIGNMENT episode

    def state(self):
        state = {"support": self.support.state(), "query": {line: s.state() for line, s in self.query.items()}}
        return state | ({"fine_tune": self.fine_tune.state()} if self.fine_tune else {})

    def load_state(self, state):
        self.support.load_state(state["support"])
        for lang, s in self.query.items():
            s.load_state(state["query"][lang])
        if self.fine_tune:
            self.fine_tune.load_state(state["fine_tune"])


def held_out_episode(tokenizer, source_lang, priming_langs, data_dir, eval_sentences, batch_size, max_len, device="cpu",
                     fmt=None):
    """{"support": one source-language dev batch, "query": priming-language dev batches}."""
    def dev_batches(lang, n_sentences):
        dev = batch_stream(tokenizer, lang, "dev", data_dir, n_sentences, batch_size, max_len,
                           derive_seed(0, "held-out batches"), device, fmt=fmt)
        return [dev.next_batch() for _ in range(max(1, len(dev.examples) // batch_size))]
    return {"support": dev_batches(source_lang, batch_size)[0],
            "query": [b for lang in priming_langs for b in dev_batches(lang, eval_sentences)]}


def query_loss(loss_fn, fast, batches):
    """Mean loss of the model with the fast tensors `fast` over `batches`, no graph kept."""
    with torch.no_grad():
        detached = {n: t.detach() for n, t in fast.items()}
        return sum(loss_fn(detached, b).item() for b in batches) / len(batches)


def held_out_losses(model, held_out, loss_fn, inner, reference_loss=None):
    """Meta-validation (dropout off, nothing kept). A fixed fresh phi is adapted by the inner
    loop `inner` (maml.InnerLoop, run first order) on the held-out support batch; the held-out query batches are scored
    before and after:
      held_out_query_loss        after adaptation (what priming minimises)
      held_out_query_loss_fresh  before adaptation (fresh PEFT tensors and head)
      inner_loop_strength        (fresh - adapted) / (fresh - reference): the share of the gap
                                 to a normally fine-tuned PEFT model (`reference_query_loss`)
                                 that the inner loop closes; 1 = as good as downstream
                                 fine-tuning, 0 = no better than the fresh tensors."""
    was_training = model.training
    model.eval()
    fresh = held_out_phi(model)
    adapted = inner.first_order_copy().adapt(loss_fn, fresh, held_out["support"])
    losses = adapted_losses(held_out, loss_fn, fresh, adapted, reference_loss)
    model.train(was_training)
    return losses


def held_out_phi(model):
    """The fixed fresh phi of meta-validation (the same draw at every evaluation)."""
    return peft_state.fresh_peft_tensors(model, torch.Generator().manual_seed(derive_seed(0, "held-out phi")))


def adapted_losses(held_out, loss_fn, fresh, adapted, reference_loss=None):
    """The held-out query loss of `adapted` and of `fresh`, and the inner-loop strength (see
    `held_out_losses`). Call with dropout off. The implicit inner loop scores its phi_hat here."""
    losses = {"held_out_query_loss": query_loss(loss_fn, adapted, held_out["query"]),
              "held_out_query_loss_fresh": query_loss(loss_fn, fresh, held_out["query"])}
    if reference_loss is not None:
        gap = losses["held_out_query_loss_fresh"] - reference_loss
        losses["inner_loop_strength"] = (losses["held_out_query_loss_fresh"] - losses["held_out_query_loss"]) / gap
    return losses


def reference_query_loss(model, folder, held_out, loss_fn):
    """The held-out query loss of a normally fine-tuned PEFT model (a finetune_peft.py folder
    trained on the input model): what full downstream fine-tuning reaches."""
    tensors, _ = peft_state.read_peft(model, folder)
    was_training = model.training
    model.eval()
    loss = query_loss(loss_fn, tensors, held_out["query"])
    model.train(was_training)
    return loss
