"""GPT family: LayerNorm, GELU MLP, learned absolute positions, tied embeddings, biases.

    configs/gpt.py                         the `tiny` size (default)
    configs/gpt.py:size=small,position=rope
    configs/gpt.py:preset=gpt2-small        a published shape (see scalax/models/presets.py)
    configs/gpt.py:d_model=512,n_layers=8   the parametric family used by sweeps

Every default is in configs/common.py; this experiment changes none of them.
"""

from scalax.config import import_config

common = import_config("common", __file__)


def get_config(arg: str | None = None):
    return common.experiment("gpt", arg)
