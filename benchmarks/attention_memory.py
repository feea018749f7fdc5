"""The longest context whose train step fits a memory limit, per attention implementation (`scalax plan`'s
numbers: the step compiled ahead of time, its peak per device from XLA's memory analysis).

    python benchmarks/attention_memory.py [--config configs/llama.py:d_model=64,n_layers=2] [--heads 8]
        [--limit-from einsum/1:1024] [--max-len 16384] [--impls einsum/1,einsum,chunked]

The limit is the peak of one implementation at one length (default: einsum's whole [T, S] scores at 1024 tokens);
every implementation is then planned at doubling lengths until its peak passes the limit. `einsum/1` is einsum
with its queries in one block, as GPUs and TPUs compile it; `einsum` is as this machine compiles it (on CPU in
query blocks that skip the scores above the causal diagonal: `attention.query_blocks_for`). Batch 1, float32,
full rematerialisation (so the scores, not the saved activations, decide), one device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from unittest import mock

from scalax import config as config_lib
from scalax.models import attention
from scalax.parallel.devices import GIB
from scalax.train import memory


def peak(spec: str, impl: str, seq_len: int, heads: int, block: int) -> int:
    if impl == "einsum/1":
        with mock.patch.object(attention, "query_blocks_for", lambda T: 1):
            return peak(spec, "einsum", seq_len, heads, block)
    overrides = [f"--config.model.attention={impl}", f"--config.model.attention_block={block}",
                 f"--config.model.n_heads={heads}", f"--config.model.n_kv_heads={heads}",
                 f"--config.model.max_seq_len={seq_len}", f"--config.train.seq_len={seq_len}",
                 "--config.train.batch_size=1", "--config.model.dtype=float32", "--config.model.remat=full",
                 "--config.mesh.data=1"]
    return memory.memory_plan(config_lib.load(spec, overrides), 1)["peak_per_device"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/llama.py:d_model=64,n_layers=2")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--limit-from", default="einsum/1:1024")
    parser.add_argument("--max-len", type=int, default=16384)
    parser.add_argument("--impls", default="einsum/1,einsum,chunked")
    args = parser.parse_args()
    limit_impl, limit_len = args.limit_from.split(":")
    limit = peak(args.config, limit_impl, int(limit_len), args.heads, args.block)
    print(f"limit: {limit / GIB:.4f} GiB ({limit_impl} at {limit_len} tokens)")
    rows = {}
    for impl in args.impls.split(","):
        length, fits = 256, 0
        while length <= args.max_len:
            used = peak(args.config, impl, length, args.heads, args.block)
            print(f"  {impl:10s} {length:6d} tokens: peak {used / GIB:.4f} GiB", flush=True)
            if used > limit:
                break
            fits, length = length, length * 2
        rows[impl] = fits
    print(json.dumps({"machine": platform.processor() or platform.machine(), "date": str(datetime.date.today()),
                      "config": args.config, "heads": args.heads, "block": args.block, "limit_bytes": limit,
                      "longest_context_within_limit": rows}))


if __name__ == "__main__":
    main()
