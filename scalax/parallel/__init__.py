"""Parallelism: the device mesh, logical axis rules, shardings, and shard_map pieces (the vocab-parallel loss)."""
