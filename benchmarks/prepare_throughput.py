"""Tokenizing throughput of `scalax prepare` (data/shards.py): MB of text a second and tokens a second, with one
worker process and with one per core, for the byte tokenizer and a byte-level BPE (a tokenizer.json trained here
on the corpus, as a user's GPT-2 or Llama 3 file would be loaded). The corpus: COPIES copies of the standard
library, each file opened by a line naming its copy.

    python benchmarks/prepare_throughput.py [--copies 8] [--rounds 2]

Prints a markdown table for docs/benchmarks.md; the speed-up column is the ratio to one worker in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from ml_collections import ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scalax.data import corpora


def make_corpus(root: str, copies: int) -> int:
    """The corpus's size in bytes."""
    size = 0
    for c in range(copies):
        for doc in corpora.documents("stdlib"):
            path = os.path.join(root, f"copy{c:02d}", doc.id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = f"# copy {c}\n".encode() + doc.data
            with open(path, "wb") as f:
                f.write(data)
            size += len(data)
    return size


def make_bpe(path: str, vocab: int = 8192) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.data.decode("utf-8", "replace") for d in corpora.documents("stdlib")), trainer)
    tok.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cores = corpora.available_cores()
    with tempfile.TemporaryDirectory() as tmp:
        size = make_corpus(os.path.join(tmp, "corpus"), args.copies)
        bpe = make_bpe(os.path.join(tmp, "tokenizer.json"))
        print(f"{platform.machine()}, {cores} cores; corpus {size / 1e6:.0f} MB ({args.copies} copies of the "
              "standard library)\n")
        print("| tokenizer | workers | MB/s (median) | tokens/s | speed-up |\n|---|---|---|---|---|")
        for name, tokenizer in (("byte", "byte"), ("BPE 8192 (tokenizer.json)", bpe)):
            base = None
            for workers in sorted({1, cores}):
                times, tokens = [], 0
                for r in range(args.rounds):
                    cfg = ConfigDict(dict(corpus=os.path.join(tmp, "corpus"), text_field="text", tokenizer=tokenizer,
                                          bpe_vocab_size=0, val_fraction=0.02, shard_tokens=2**26,
                                          cache_dir=os.path.join(tmp, f"cache-{workers}-{r}")))
                    start = time.perf_counter()
                    splits = corpora.load_splits(cfg, log=lambda m: None, workers=workers)
                    times.append(time.perf_counter() - start)
                    tokens = len(splits.train) + len(splits.val)
                seconds = statistics.median(times)
                base = base or seconds
                print(f"| {name} | {workers} | {size / 1e6 / seconds:.1f} | {tokens / seconds:,.0f} | "
                      f"{base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
