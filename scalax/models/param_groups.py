"""Groups of the decoder's parameters by name, defined once (FLOPs and counts, the optimizer's decay mask).

- EMBEDDING_MODULES: the top-level parameters counted as `params_embedding`, apart from N (Kaplan et al.): the
  token table (`embed`), the untied head (`head`) and a learned position table (`pos_embed`). A T5
  relative-bias table is a per-head scalar per distance bucket, used inside every attention layer: counted in
  N, as Hoffmann et al. and the T5 authors count it.
- TABLE_LEAVES: the leaves that are looked up rather than multiplied: the token table (`embedding`), the learned
  position table (`pos_embed`) and the T5 relative-bias table (`relpos_bias`). Weight decay skips them unless
  `optim.decay_embeddings`, as it skips norms and biases always.
"""

EMBEDDING_MODULES = ("embed", "head", "pos_embed")
TABLE_LEAVES = ("embedding", "pos_embed", "relpos_bias")
