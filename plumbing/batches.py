"""From sentences to model inputs, for all three stages: sub-word tokenisation with the label on
each word's first sub-word, length-bucketed batches with dynamic padding, and the endless,
resumable batch stream the training loops draw from.

    from plumbing.batches import encode_sentences, BatchStream
    examples = encode_sentences(train, tokenizer, max_len=128)        # train: ner_data.load_wikiann(...)
    stream = BatchStream(examples, batch_size=16, seed=0, pad_id=tokenizer.pad_token_id)
    batch = stream.next_batch()     # dict of padded tensors: input_ids, attention_mask, labels
"""

import torch

PAD_MULTIPLE = 8  # on a GPU, batch lengths are rounded up to this (tensor cores work in tiles of 8)
IGNORE = -100  # label of sub-words that carry no prediction (torch's cross-entropy ignore_index)


# ----------------------------------------------------------------------------------------
# Sub-word tokenisation with label alignment

def encode_sentences(dataset, tokenizer, max_len=128):
    """Tokenise pre-split sentences; label the first sub-word of each word, -100 elsewhere.

    Returns a list of dicts: input_ids, labels, word_ids (the word of each position, None for
    special tokens and non-first sub-words) and n_words. Words beyond max_len are cut; words
    that give no sub-word at all (e.g. a lone zero-width space) simply have no position: both
    are predicted "O" when mapped back to words (`word_predictions`)."""
    enc = tokenizer(list(dataset["tokens"]), is_split_into_words=True, truncation=True, max_length=max_len)
    examples = []
    for i, tags in enumerate(list(dataset["ner_tags"])):
        word_ids = enc.word_ids(i)
        labels, first_words, previous = [], [], None
        for w in word_ids:
            first = w is not None and w != previous
            labels.append(tags[w] if first else IGNORE)
            first_words.append(w if first else None)
            previous = w
        examples.append({"input_ids": enc["input_ids"][i], "labels": labels,
                         "word_ids": first_words, "n_words": len(tags)})
    return examples


def word_predictions(token_predictions, word_ids, n_words, outside=0):
    """Map per-position label ids back to one label id per word (missing words -> O)."""
    words = [outside] * n_words
    for pred, w in zip(token_predictions, word_ids):
        if w is not None:
            words[w] = int(pred)
    return words


# ----------------------------------------------------------------------------------------
# Length-bucketed batching with dynamic padding

def bucketed_batches(lengths, batch_size=32, max_tokens=None, generator=None, pool_batches=100):
    """Index lists that cover every example exactly once.

    Shuffle, cut into pools of `pool_batches` batches, sort each pool by length, cut it into
    batches of similar lengths, then shuffle the batches: little padding, still random. With
    max_tokens, a batch grows while (size x longest length) stays within the budget, instead
    of a fixed batch_size. generator=None keeps the original order (no shuffling)."""
    order = torch.randperm(len(lengths), generator=generator).tolist() if generator is not None \
        else list(range(len(lengths)))
    pool_size = (batch_size or 32) * pool_batches
    batches = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lambda i: lengths[i])
        batches.extend(_cut(pool, lengths, batch_size, max_tokens))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _cut(pool, lengths, batch_size, max_tokens):
    """Cut a length-sorted pool into batches by count or by padded-token budget."""
    if max_tokens is None:
        return [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    batches, current = [], []
    for i in pool:
        if current and (len(current) + 1) * max(lengths[i], lengths[current[-1]]) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def collate(examples, pad_id, device="cpu"):
    """Pad a list of encoded examples to their longest length: input_ids, attention_mask, labels.

    On a GPU (the same code, other constants): the length is rounded up to a multiple of 8
    (tensor-core tile sizes), and the batch is built in pinned host memory and copied with
    non_blocking=True, so the copy overlaps the previous step's kernels. On the CPU neither
    helps: no rounding (padding is wasted compute there), plain copies."""
    cuda = torch.device(device).type == "cuda"
    width = max(len(e["input_ids"]) for e in examples)
    if cuda:
        width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if cuda:
        return {k: t.pin_memory().to(device, non_blocking=True) for k, t in batch.items()}
    return {k: t.to(device) for k, t in batch.items()}


def padding_efficiency(batches, lengths):
    """Real tokens / padded tokens over a list of index batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / padded


class BatchStream:
    """An endless, seeded stream of padded batches, epoch after epoch.

    Epoch e uses the batches drawn with seed (seed, e), so the stream's whole state is
    (epoch, position): `state()` / `load_state()` make a resumed run draw the same batches."""

    def __init__(self, examples, batch_size=16, seed=0, pad_id=1, device="cpu", max_tokens=None):
        if not examples:
            raise ValueError("no examples to batch: check --max-sentences and the data folder")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id, self.device, self.max_tokens = pad_id, device, max_tokens
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.epoch, self.position, self._batches = 0, 0, None

    def _epoch_batches(self):
        if self._batches is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._batches = bucketed_batches(self.lengths, self.batch_size, self.max_tokens, g)
        return self._batches

    def next_batch(self):
        batches = self._epoch_batches()
        if self.position >= len(batches):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            batches = self._epoch_batches()
        batch = batches[self.position]
        self.position += 1
        return collate([self.examples[i] for i in batch], self.pad_id, self.device)

    def state(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state):
        self.epoch, self.position, self._batches = state["epoch"], state["position"], None
