"""Runs `scalax train` (argv as given) and records which training windows this process read, into the JSON
file named by SCALAX_TEST_READS: the multi-process test checks that each process read only its half."""

import json
import os
import sys

from scalax import cli
from scalax.data import pipeline

reads: list[tuple[int, int]] = []  # (length of the split, window index)
original = pipeline.Windows.__getitem__


def recording(self, i):
    reads.append((len(self.tokens), int(i)))
    return original(self, i)


pipeline.Windows.__getitem__ = recording
code = cli.main(sys.argv[1:])
with open(os.environ["SCALAX_TEST_READS"], "w") as f:
    json.dump(reads, f)
sys.exit(code)
