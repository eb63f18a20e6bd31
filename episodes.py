"""Priming episodes (METHOD.md, "One priming episode"): where support and query batches come
from, and the held-out episode that meta-validation scores.

    source = EpisodeSource(tokenizer, "en", query_languages("en", ["de", "es"], "cross"), data_dir, ...)
    support, query = source.sample(n_tasks=2, generator=task_rng)[0]
    held_out = held_out_episode(tokenizer, "en", ["de", "es"], data_dir, ...)
    phi_0 = phi_0_of_tasks(model, "peft", False, phi_rng, n_tasks=2, mine=range(2))  # where phi starts
    held_out_losses(model, held_out, loss_fn, dict(steps=3, lr=0.1))
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

import maml
from adapters import body_parameters, fresh_peft_tensors, peft_parameters
from peft_checkpoint import read_peft
from plumbing.batches import BatchStream, encode_sentences
from plumbing.cli import derive_seed
from plumbing.ner_data import load_wikiann
from plumbing.pretrained import evaluation_mode


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

    def stream_states(self):
        state = {"support": self.support.state(), "query": {lang: s.state() for lang, s in self.query.items()}}
        return state | ({"fine_tune": self.fine_tune.state()} if self.fine_tune else {})

    def load_stream_states(self, state):
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



# ----------------------------------------------------------------------------- where phi starts
# METHOD.md, "One priming episode", step 2: phi_0 of a task, and which tensors are fast.

def peft_start(model, generator, outer_peft):
    """The paper: fresh PEFT tensors and head drawn as downstream PEFT draws them, so the inner loop
    simulates a fresh fine-tuning; --outer-peft: the model's own meta-learned ones (plain MAML)."""
    # BEGIN ASSIGNMENT phi_start
    return dict(peft_parameters(model)) if outer_peft else dict(fresh_peft_tensors(model, generator))
    # END ASSIGNMENT phi_start


def all_start(model, generator, outer_peft):
    """Standard MAML (--inner-params all): the body's trainable Parameters are fast too."""
    body = {n: p for n, p in body_parameters(model).items() if p.requires_grad}
    return {**body, **peft_start(model, generator, outer_peft)}


# What the inner loop adapts (--inner-params): name -> start(model, generator, outer_peft), called for every task of
# the meta-batch, in order, when the meta-step begins. It returns the task's phi_0, or a function of no argument
# that returns it, called when the task's inner loop begins: for a task that must also set the model up (tensors the
# forward uses but the inner loop does not adapt).
INNER_PARAMS = {"peft": peft_start, "all": all_start}


def phi_0_of_tasks(model, inner_params, outer_peft, generator, n_tasks, mine):
    """phi_0 of this process's tasks `mine` (indices into the meta-batch), as a function of the
    task's position in `mine`. Drawn for every task of the meta-batch in order, so task j starts
    from the same phi_0 whichever process runs it (and as in a one-process run); a start that
    returned a function is called when its task begins (only for this process's tasks)."""
    # BEGIN ASSIGNMENT phi_start
    starts = [INNER_PARAMS[inner_params](model, generator, outer_peft) for _ in range(n_tasks)]
    return lambda i: starts[mine[i]]() if callable(starts[mine[i]]) else starts[mine[i]]
    # END ASSIGNMENT phi_start


def query_loss(loss_fn, fast, batches):
    """Mean loss of the model with the fast tensors `fast` over `batches`, no graph kept."""
    with torch.no_grad():
        detached = {n: t.detach() for n, t in fast.items()}
        return sum(loss_fn(detached, b).item() for b in batches) / len(batches)


def held_out_losses(model, held_out, loss_fn, inner, reference_loss=None):
    """Meta-validation (dropout off, nothing kept). A fixed fresh phi is adapted by the inner
    loop (`inner`: maml.inner_loop's settings, run first order) on the held-out support batch; the
    held-out query batches are scored before and after:
      held_out_query_loss        after adaptation (what priming minimises)
      held_out_query_loss_fresh  before adaptation (fresh PEFT tensors and head)
      inner_loop_strength        (fresh - adapted) / (fresh - reference): the share of the gap
                                 to a normally fine-tuned PEFT model (`reference_query_loss`)
                                 that the inner loop closes; 1 = as good as downstream
                                 fine-tuning, 0 = no better than the fresh tensors."""
    with evaluation_mode(model):
        fresh = held_out_phi(model)
        adapted = maml.inner_loop(loss_fn, fresh, held_out["support"], **{**inner, "first_order": True})
        return adapted_losses(held_out, loss_fn, fresh, adapted, reference_loss)


def held_out_phi(model):
    """The fixed fresh phi of meta-validation (the same draw at every evaluation)."""
    return fresh_peft_tensors(model, torch.Generator().manual_seed(derive_seed(0, "held-out phi")))


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
    tensors, _ = read_peft(model, folder)
    with evaluation_mode(model):
        return query_loss(loss_fn, tensors, held_out["query"])


def body_snapshot(model) -> "dict[str, torch.Tensor]":
    """Copies of the body's non-embedding weights now: the origin body_change measures from
    (the embeddings are 80% of e5-small and barely move, so they would hide the change)."""
    return {n: p.detach().clone() for n, p in body_parameters(model).items() if "embeddings" not in n}


def body_change(model, snapshot) -> float:
    """How far the body moved: ||theta - theta_0|| / ||theta_0|| over the snapshot's weights."""
    params = dict(model.named_parameters())
    moved = sum((params[n].detach().double() - t.double()).pow(2).sum() for n, t in snapshot.items())
    return float(moved.sqrt() / sum(t.double().pow(2).sum() for t in snapshot.values()).sqrt())
