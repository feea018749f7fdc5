"""Groups of the decoder's parameters by name, defined once (FLOPs and counts, the optimizer's decay mask).

- EMBEDDING_MODULES: the top-level parameters counted as `params_embedding`, apart from N (Kaplan et al.): the
  token table (`embed`), the untied head (`head`) and a positional scheme's table that is looked up into the
  input (`table_is_embedding`: the learned `pos_embed`). A T5 relative-bias table is a per-head scalar per
  distance bucket, used inside every attention layer: counted in N, as Hoffmann et al. and the T5 authors count
  it.
- TABLE_LEAVES: the leaves that are looked up rather than multiplied: the token table (`embedding`) and every
  positional scheme's table (`pos_embed`, `relpos_bias`). Weight decay skips them unless
  `optim.decay_embeddings`, as it skips norms and biases always.
"""

from scalax.models.positions import SCHEMES

EMBEDDING_MODULES = ("embed", "head", *(s.table_name for s in SCHEMES.values() if s.table_is_embedding))
TABLE_LEAVES = ("embedding", *(s.table_name for s in SCHEMES.values() if s.table_name))
