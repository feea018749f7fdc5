"""Data: tokenizers, corpora and token caches, the grain input pipeline."""
