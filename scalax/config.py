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
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from scalax import io
from scalax.data import tokenizers
from scalax.errors import ConfigError
from scalax.models import positions, presets
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


# ---------------------------------------------------------------------- loading and overriding
RUN_SECTIONS = ("model", "train", "optim", "data", "mesh")


def load_run(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`load` for the commands that take one run's config (info, train, prepare, plan, bench, coordcheck): a sweep
    config, or a file without a run's sections, is named in one line."""
    cfg = load(spec, overrides)
    missing = [section for section in RUN_SECTIONS if section not in cfg]
    if missing:
        what = ("a sweep config (it has `sweep` and `base` sections: run it with `scalax sweep`)" if "sweep" in cfg
                else f"it has no {', '.join(missing)} section")
        raise ConfigError("--config", f"not a run config: {what}; allowed: a run config such as configs/llama.py or "
                                      "a run's config.json")
    return cfg


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]`, call its get_config(arg), then apply `--config.KEY=VALUE` overrides."""
    path, arg = _split_spec(spec)
    if path.endswith(".json") and (io.is_remote(path) or os.path.isfile(path)):  # a resolved config, as runs
        io.check_input(path, "--config")                                           # and sweeps write them
        if not io.isfile(path):
            raise ConfigError("--config", f"no such config file: {path}")
        try:
            cfg = ml_collections.ConfigDict(json.loads(io.read_text(path)))
        except (ValueError, TypeError) as e:
            raise ConfigError("--config", f"{path} is not a JSON config tree: {e}") from None
        for item in overrides:
            apply_override(cfg, item)
        return cfg
    if not path.endswith(".py"):
        raise ConfigError("--config", f"expected a config file PATH.py[:ARG] or PATH.json, got {spec!r}")
    if not os.path.isfile(path):
        # Fall back to the checkout's own configs/ (an editable install run from another directory).
        beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.isabs(path) or not os.path.isfile(beside_package):
            raise ConfigError("--config", f"no such config file: {path}")
        path = beside_package
    module_spec = importlib.util.spec_from_file_location(f"scalax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError("--config", f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("--config", f"{path}: loading it raised {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError("--config", f"{path} defines no get_config(arg)")
    try:
        cfg = module.get_config(arg or None)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("--config", f"{path}: get_config({arg or None!r}) raised {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError("--config", f"{path}: get_config returned a {type(cfg).__name__}; allowed: a ConfigDict")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def _split_spec(spec: str) -> tuple[str, str]:
    """PATH.py:ARG -> (PATH.py, ARG); a URL's own colon (gs://...) is not an ARG separator."""
    prefix = ""
    if "://" in spec:
        prefix, spec = spec.split("://", 1)
        prefix += "://"
    path, _, arg = spec.partition(":")
    return prefix + path, arg


def import_config(name: str, beside: str):
    """The config module NAME.py from the folder of the config file `beside` (configs/common.py, say), for
    pieces that several config files share."""
    path = os.path.join(os.path.dirname(os.path.abspath(beside)), f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"scalax_config_{name}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(dotted, f"is a section, not a value; set one of its keys: --config.{dotted}.KEY=VALUE "
                          f"with KEY one of {', '.join(sorted(node[leaf].keys()))}")
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
    """The validated ModelConfig of an experiment config; `model.vocab_size` 0 means the tokenizer's."""
    fields = cfg.model.to_dict()
    if fields.get("vocab_size") == 0:
        fields["vocab_size"] = tokenizers.vocab_size(cfg.data.get("tokenizer", "byte"),
                                                     cfg.data.get("bpe_vocab_size", 0),
                                                     cfg.data.get("vocab_multiple", 1))
    return ModelConfig.from_dict(fields)


def check_seq_len(seq_len: int, model: ModelConfig) -> None:
    """train.seq_len must be positive and within the model's context (model.max_seq_len: the learned position
    table, or the context every other scheme declares)."""
    if seq_len <= 0:
        raise ConfigError("train.seq_len", f"must be a positive integer, got {seq_len}")
    if seq_len > model.max_seq_len:
        what = positions.scheme_of(model).context_name
        raise ConfigError("train.seq_len", f"{seq_len} exceeds {what} (model.max_seq_len={model.max_seq_len}); "
                          f"allowed: at most {model.max_seq_len}, or raise model.max_seq_len")


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between two config trees (plain dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def plain(cfg: ml_collections.ConfigDict | dict) -> dict:
    """A config tree as JSON gives it back (lists, not tuples): what a saved config compares equal to."""
    return json.loads(json.dumps(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg))
