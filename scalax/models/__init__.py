"""Models: one linen decoder whose behaviour is chosen by a validated ModelConfig."""

from scalax.models.config import ModelConfig
from scalax.models.decoder import Decoder, init_cache

__all__ = ["Decoder", "ModelConfig", "init_cache"]
