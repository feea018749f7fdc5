"""LLaMA family: pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, untied head.

    configs/llama.py                         the `tiny` size (default)
    configs/llama.py:size=tiny,position=alibi
    configs/llama.py:preset=llama3-8b        a published shape (see scalax/models/presets.py)
    configs/llama.py:d_model=512,n_layers=8  the parametric family used by sweeps

Every default is in configs/common.py; this experiment changes none of them.
"""

from scalax.config import import_config

common = import_config("common", __file__)


def get_config(arg: str | None = None):
    return common.experiment("llama", arg)
