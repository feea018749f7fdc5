"""scalax: language-model scaling experiments in JAX, from one config to a fitted scaling law."""

__version__ = "0.1.0"
