"""Foundation figures: padding efficiency of length bucketing, first-use conversion time.

    python experiments/benchmarks/bench_data.py --data-dir ../shared/data/wikiann

Prints padding efficiency (real tokens / padded tokens) over the English train split at
batch 32, with and without bucketing (target: at least 0.90 with it), and the time of the
first-use conversion of the default model (into a fresh temporary cache) and of a cached load.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root
from plumbing.batches import bucketed_batches, encode_sentences, padding_efficiency  # noqa: E402
from plumbing.ner_data import load_wikiann  # noqa: E402
from plumbing.pretrained import load_token_classifier, load_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="PAN-X folder (default: $WIKIANN_DIR)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--max-len", type=int, default=128, help="sub-word truncation length")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        os.environ["PRIMING_CACHE"] = cache
        start = time.perf_counter()
        tokenizer = load_tokenizer("e5-small")
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        load_tokenizer("e5-small"), load_token_classifier("e5-small", num_labels=7)
        cached_s = time.perf_counter() - start
    print(f"first-use conversion: {convert_s:.1f} s; cached load (tokenizer + model): {cached_s:.1f} s")

    train = load_wikiann("en", "train", args.data_dir)
    lengths = [len(e["input_ids"]) for e in encode_sentences(train, tokenizer, args.max_len)]
    g = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(len(lengths), generator=g).tolist()
    plain = [shuffled[i:i + args.batch_size] for i in range(0, len(lengths), args.batch_size)]
    bucketed = bucketed_batches(lengths, args.batch_size, generator=g)
    print(f"padding efficiency, en train ({len(lengths)} sentences), batch {args.batch_size}: "
          f"random batches {padding_efficiency(plain, lengths):.3f}, "
          f"bucketed {padding_efficiency(bucketed, lengths):.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
