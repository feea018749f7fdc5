"""Experiment configs: ml-collections trees with sections `model`, `train`, `optim`, `data`, `mesh`.

Config files (configs/*.py) define `get_config(arg)`, big_vision style: the arg string picks structure,
`--config.KEY=VALUE` then overrides any field:

    configs/llama.py:preset=llama3-8b
    configs/llama.py:size=tiny,position=alibi --config.model.n_kv_heads=1
    configs/gpt.py:d_model=512,n_layers=8        (the parametric family, for sweeps)
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from scalax.errors import ConfigError
from scalax.models import presets
from scalax.models.config import ModelConfig

STRUCTURE_KEYS = ("preset", "size", "d_model", "n_layers")


def parse_arg(arg: str | None) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'}."""
    out: dict[str, str] = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--config", f"config argument item {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def model_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}


def model_fields(family: str, arg: str | None) -> dict[str, Any]:
    """The `model` section for a family from the config arg: `preset=NAME`, `size=NAME`, or
    `d_model=D,n_layers=L` (the parametric family); other items set model fields (`position=alibi`)."""
    items = parse_arg(arg)
    if "preset" in items:
        if {"size", "d_model", "n_layers"} & set(items):
            raise ConfigError("--config", "give either preset=NAME, size=NAME or d_model=D,n_layers=L, not several")
        fields = presets.preset(items.pop("preset"))
    elif "d_model" in items or "n_layers" in items:
        if "size" in items or not {"d_model", "n_layers"} <= set(items):
            raise ConfigError("--config", "the parametric family needs both d_model=D and n_layers=L (and no size)")
        fields = presets.family(family, _parse_int("d_model", items.pop("d_model")),
                                _parse_int("n_layers", items.pop("n_layers")))
    else:
        fields = presets.named_size(family, items.pop("size", "tiny"))
    section = {**model_defaults(), **fields}
    for key, text in items.items():
        if key not in section:
            allowed = ", ".join([*STRUCTURE_KEYS, *sorted(section)])
            raise ConfigError("--config", f"unknown config argument {key!r}; allowed: {allowed}")
        section[key] = parse_value(f"model.{key}", text, section[key])
    return section


def build(family: str, arg: str | None) -> ml_collections.ConfigDict:
    """The whole experiment tree for a model family. Sections other than `model` are filled by the
    training, data and parallelism layers."""
    model = model_fields(family, arg)
    cfg = ml_collections.ConfigDict()
    cfg.model = model
    cfg.train = ml_collections.ConfigDict({"seq_len": model["max_seq_len"]})
    cfg.optim = ml_collections.ConfigDict()
    cfg.data = ml_collections.ConfigDict()
    cfg.mesh = ml_collections.ConfigDict()
    return cfg


# ---------------------------------------------------------------------- loading and overriding
def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]`, call its get_config(arg), then apply `--config.KEY=VALUE` overrides."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError("--config", f"expected a config file PATH.py[:ARG], got {spec!r}")
    if not os.path.isfile(path):
        # Fall back to the checkout's own configs/ (an editable install run from another directory).
        beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.isabs(path) or not os.path.isfile(beside_package):
            raise ConfigError("--config", f"no such config file: {path}")
        path = beside_package
    module_spec = importlib.util.spec_from_file_location(f"scalax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError("--config", f"{path} defines no get_config(arg)")
    cfg = module.get_config(arg or None)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `--config.a.b=value` (or `config.a.b=value`); the value is parsed as the field's type."""
    text = item.removeprefix("--")
    if not text.startswith("config.") or "=" not in text:
        raise ConfigError(item, "expected --config.KEY=VALUE")
    dotted, _, value = text[len("config."):].partition("=")
    *parents, leaf = dotted.split(".")
    node = cfg
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(".".join(parents[: i + 1]), _unknown_key_message(node))
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ConfigError(dotted, _unknown_key_message(node))
    node[leaf] = parse_value(dotted, value, node[leaf])


def _unknown_key_message(node: Any) -> str:
    keys = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "(none)"
    return f"unknown config key; allowed here: {keys}"


def parse_value(key: str, text: str, current: Any) -> Any:
    """Parse `text` as the type of the `current` value (bool, int, float, str; None: a Python literal)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(key, f"expected true or false, got {text!r}")
    if isinstance(current, int):
        return _parse_int(key, text)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_int(key: str, text: str) -> int:
    try:
        value = float(text)  # accepts 1e6
    except ValueError:
        raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise ConfigError(key, f"expected an integer, got {text!r}")
    return int(value)


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The validated ModelConfig of an experiment config."""
    return ModelConfig.from_dict(cfg.model.to_dict())
