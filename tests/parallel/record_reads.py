"""Runs `scalax train` (argv as given) and records, into the JSON file named by SCALAX_TEST_READS, which training
windows this process consumed at each step (read-ahead that no step used is left out): the multi-process tests
check that each process consumed only its share of every global batch, and that a resume on another process
count goes on with the same global batches."""

import json
import os
import sys

from scalax import cli
from scalax.data import pipeline

index_of: dict[bytes, int] = {}  # a training window's tokens -> its index (windows of stdlib text are unique)
consumed: list[list[int]] = []  # per step: the window indices of this process's rows
original_take, original_iterator = pipeline.Windows.take, pipeline.iterator


def recording_take(self, ids):
    windows = original_take(self, ids)
    for i, window in zip(ids, windows, strict=True):
        index_of[window.tobytes()] = int(i)
    return windows


class Recording:
    def __init__(self, inner):
        self.inner = inner

    def __next__(self):
        batch = next(self.inner)
        consumed.append([index_of[row.tobytes()] for row in batch])
        return batch

    def __getattr__(self, name):  # get_state, set_state
        return getattr(self.inner, name)


pipeline.Windows.take = recording_take
pipeline.iterator = lambda ds, prefetch=16: Recording(original_iterator(ds, prefetch))
code = cli.main(sys.argv[1:])
with open(os.environ["SCALAX_TEST_READS"], "w") as f:
    json.dump(consumed, f)
sys.exit(code)
