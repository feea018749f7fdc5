"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM directories (config.json plus
safetensors, one file or sharded with an index) <-> (ModelConfig, scalax parameters).

Weights are read and written through safetensors' numpy API, so no torch is needed. Layout differences:
torch Linear weights are [out, in] and ours [in, out] with heads split out ([D, H, K], [H, K, D]); GPT-2's
Conv1D weights are already [in, out] and its fused c_attn holds q, k and v side by side. RoPE uses the same
rotate-half layout as Hugging Face's Llama, so q and k need no permutation. Anything else (another
architecture, another RoPE type, biases a Llama checkpoint says it has, exact-erf GELU) is refused with a
clear message rather than converted approximately.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from scalax.errors import ScalaxError
from scalax.io import atomic_write_json
from scalax.models import Decoder, ModelConfig, presets
from scalax.models.decoder import stack_layers, unstack_layers

ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")
# transformers' rope_type -> model.rope_scaling (models/positions.py ROPE_SCALINGS)
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "ntk", "yarn": "yarn", "llama3": "llama3"}
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation, as flax's nn.gelu


class ConversionError(ScalaxError):
    """A Hugging Face directory scalax cannot convert (missing, unsupported, or inconsistent)."""


# ---------------------------------------------------------------------- configs
def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{where}: unsupported architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_GELUS:
            raise ConversionError(f"{where}: activation_function {act!r} is not supported; allowed: "
                                  f"{', '.join(GPT2_GELUS)} (the tanh GELU)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ConversionError(f"{where}: {key}=true is not supported")
        d = hf["n_embd"]
        return ModelConfig(**{**presets.FAMILY_FEATURES["gpt"], **presets.COMMON_FEATURES, **dict(
            vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), dtype="float32")})
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; allowed: silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported (LLaMA has no biases)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"{where}: unsupported rope type {rope_type!r}; allowed: {', '.join(ROPE_TYPES)}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    fields: dict[str, Any] = {**presets.FAMILY_FEATURES["llama"], **presets.COMMON_FEATURES, **dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), dtype="float32")}
    if hf.get("head_dim"):
        fields["head_dim"] = hf["head_dim"]
    fields.update(_rope_scaling_from_hf(ROPE_TYPES[rope_type], rope, hf, where))
    return ModelConfig(**fields)


def _rope_scaling_from_hf(kind: str, rope: dict, hf: dict, where: str) -> dict[str, Any]:
    """The model.rope_* fields of a transformers rope_parameters (or rope_scaling) dict of one `kind`."""
    if kind == "none":
        return {}
    if kind == "linear":  # positions divided by the factor, whatever the context
        return dict(rope_scaling=kind, rope_scaling_factor=float(rope["factor"]))
    context = hf["max_position_embeddings"] if kind == "ntk" else rope.get("original_max_position_embeddings")
    if context is None:
        raise ConversionError(f"{where}: rope type {kind!r} needs original_max_position_embeddings")
    factor = rope.get("factor") or hf["max_position_embeddings"] / context
    fields: dict[str, Any] = dict(rope_scaling=kind, rope_scaling_factor=float(factor),
                                  rope_original_context=int(context))
    if kind == "llama3":
        fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]))
    if kind == "yarn":
        if rope.get("truncate", True) is not True:
            raise ConversionError(f"{where}: YaRN with truncate={rope['truncate']!r} is not supported; allowed: true")
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):  # DeepSeek's form of it
            def mscale(m: float) -> float:
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
            attention = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
        fields.update(rope_beta_fast=float(rope.get("beta_fast") or 32),
                      rope_beta_slow=float(rope.get("beta_slow") or 1), rope_attention_factor=float(attention or 0.0))
    return fields


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
    """transformers' rope_scaling dict of a config (None: no scaling)."""
    if cfg.rope_scaling == "none":
        return None
    hf_type = {kind: hf_type for hf_type, kind in ROPE_TYPES.items()}[cfg.rope_scaling]
    out: dict[str, Any] = {"rope_type": hf_type, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = cfg.rope_original_context
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling == "yarn":
        out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
    return out


def _family(cfg: ModelConfig) -> str:
    """Which Hugging Face architecture a scalax config is, by its features (refusing what is neither)."""
    if cfg.parameterization != "sp":
        raise ConversionError(f"model.parameterization is {cfg.parameterization!r}: its logit multiplier and 1/K "
                              "attention scale have no key in a transformers config, so the export is refused "
                              "rather than made to give other outputs; export an sp model")
    family = presets.family_of(cfg)
    # beyond the family's features, what each Hugging Face class cannot express
    if family == "gpt" and cfg.n_kv_heads == cfg.n_heads and cfg.head_dim == cfg.d_model // cfg.n_heads:
        return "GPT2LMHeadModel"
    if family == "llama" and cfg.rope_fraction == 1.0:
        return "LlamaForCausalLM"
    raise ConversionError("this model is neither GPT-2 shaped (layernorm, gelu, biases, learned positions, tied "
                          "embeddings, MHA) nor LLaMA shaped (rmsnorm, swiglu, no biases, full RoPE), pre-norm "
                          "and without qk-norm, parallel blocks or shared layers; transformers has no class for it")


def config_to_hf(cfg: ModelConfig) -> dict:
    arch = _family(cfg)
    if arch == "GPT2LMHeadModel":
        return {"architectures": [arch], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
    out = {"architectures": [arch], "model_type": "llama", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
           "rope_scaling": _rope_scaling_to_hf(cfg)}
    if cfg.rope_scaling == "ntk":  # transformers' dynamic NTK scales past max_position_embeddings
        out["max_position_embeddings"] = cfg.rope_original_context
    return out


# ---------------------------------------------------------------------- weights
def _gpt2_from_hf(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict:
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    layers = []
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        w_qkv, b_qkv = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]
        attn = {name: {"kernel": w_qkv[:, j * D : (j + 1) * D].reshape(D, H, K),
                       "bias": b_qkv[j * D : (j + 1) * D].reshape(H, K)} for j, name in enumerate("qkv")}
        attn["o"] = {"kernel": t[p + "attn.c_proj.weight"].reshape(H, K, D), "bias": t[p + "attn.c_proj.bias"]}
        layers.append({
            "attn": attn,
            "attn_norm": {"scale": t[p + "ln_1.weight"], "bias": t[p + "ln_1.bias"]},
            "mlp_norm": {"scale": t[p + "ln_2.weight"], "bias": t[p + "ln_2.bias"]},
            "mlp": {"wi": {"kernel": t[p + "mlp.c_fc.weight"], "bias": t[p + "mlp.c_fc.bias"]},
                    "wo": {"kernel": t[p + "mlp.c_proj.weight"], "bias": t[p + "mlp.c_proj.bias"]}}})
    params = {f"layer_{i}": layer for i, layer in enumerate(layers)}
    params.update(embed={"embedding": t["wte.weight"]}, pos_embed=t["wpe.weight"],
                  final_norm={"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]})
    return params


def _gpt2_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    D = cfg.d_model
    t = {"wte.weight": params["embed"]["embedding"], "wpe.weight": params["pos_embed"],
         "ln_f.weight": params["final_norm"]["scale"], "ln_f.bias": params["final_norm"]["bias"]}
    for i in range(cfg.n_layers):
        layer, p = params[f"layer_{i}"], f"h.{i}."
        a = layer["attn"]
        t[p + "attn.c_attn.weight"] = np.concatenate([a[n]["kernel"].reshape(D, D) for n in "qkv"], axis=1)
        t[p + "attn.c_attn.bias"] = np.concatenate([a[n]["bias"].reshape(D) for n in "qkv"])
        t[p + "attn.c_proj.weight"] = a["o"]["kernel"].reshape(D, D)
        t[p + "attn.c_proj.bias"] = a["o"]["bias"]
        t[p + "ln_1.weight"], t[p + "ln_1.bias"] = layer["attn_norm"]["scale"], layer["attn_norm"]["bias"]
        t[p + "ln_2.weight"], t[p + "ln_2.bias"] = layer["mlp_norm"]["scale"], layer["mlp_norm"]["bias"]
        t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = layer["mlp"]["wi"]["kernel"], layer["mlp"]["wi"]["bias"]
        t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = layer["mlp"]["wo"]["kernel"], layer["mlp"]["wo"]["bias"]
    return {"transformer." + k: v for k, v in t.items()}


def _llama_from_hf(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict:
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    params: dict[str, Any] = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        params[f"layer_{i}"] = {
            "attn": {"q": {"kernel": t[p + "self_attn.q_proj.weight"].T.reshape(D, H, K)},
                     "k": {"kernel": t[p + "self_attn.k_proj.weight"].T.reshape(D, G, K)},
                     "v": {"kernel": t[p + "self_attn.v_proj.weight"].T.reshape(D, G, K)},
                     "o": {"kernel": t[p + "self_attn.o_proj.weight"].T.reshape(H, K, D)}},
            "attn_norm": {"scale": t[p + "input_layernorm.weight"]},
            "mlp_norm": {"scale": t[p + "post_attention_layernorm.weight"]},
            "mlp": {"wg": {"kernel": t[p + "mlp.gate_proj.weight"].T}, "wi": {"kernel": t[p + "mlp.up_proj.weight"].T},
                    "wo": {"kernel": t[p + "mlp.down_proj.weight"].T}}}
    params.update(embed={"embedding": t["model.embed_tokens.weight"]}, final_norm={"scale": t["model.norm.weight"]})
    if not cfg.tie_embeddings:
        params["head"] = {"kernel": t["lm_head.weight"].T}
    return params


def _llama_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = {"model.embed_tokens.weight": params["embed"]["embedding"], "model.norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = params["head"]["kernel"].T
    for i in range(cfg.n_layers):
        layer, p = params[f"layer_{i}"], f"model.layers.{i}."
        a, m = layer["attn"], layer["mlp"]
        t[p + "self_attn.q_proj.weight"] = a["q"]["kernel"].reshape(D, H * K).T
        t[p + "self_attn.k_proj.weight"] = a["k"]["kernel"].reshape(D, G * K).T
        t[p + "self_attn.v_proj.weight"] = a["v"]["kernel"].reshape(D, G * K).T
        t[p + "self_attn.o_proj.weight"] = a["o"]["kernel"].reshape(H * K, D).T
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = m["wg"]["kernel"].T, m["wi"]["kernel"].T
        t[p + "mlp.down_proj.weight"] = m["wo"]["kernel"].T
        t[p + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        t[p + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    return t


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], where: str = "the checkpoint") -> dict:
    """Hugging Face tensors -> scalax parameters (float32, in the layout cfg.scan_layers asks for)."""
    arch = _family(cfg)
    tensors = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}
    build = _gpt2_from_hf if arch == "GPT2LMHeadModel" else _llama_from_hf
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ConversionError(f"{where}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} for "
                              f"a {arch} of {cfg.n_layers} layers")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ConversionError(f"{where}: {name} has shape {tensors[name].shape}, but config.json implies {shape}")
    params = build(cfg, tensors)
    return stack_layers(params, cfg.n_layers) if cfg.scan_layers else params


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    params = _numpy(params)
    if "layers" in params:
        params = unstack_layers(params, cfg.n_layers)
    arch = _family(cfg)
    out = (_gpt2_to_hf if arch == "GPT2LMHeadModel" else _llama_to_hf)(cfg, params)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its shape (names without GPT-2's
    `transformer.` prefix): the model's own parameter shapes (init under eval_shape, nothing allocated) run
    through the real conversion as zero-strided stand-ins."""
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(
        Decoder(unrolled).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    zeros = jax.tree.map(lambda a: np.broadcast_to(np.float32(0), a.shape), shapes)
    return {k.removeprefix("transformer."): v.shape for k, v in params_to_hf(unrolled, zeros).items()}


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


# ---------------------------------------------------------------------- directories
def read_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{path}: no config.json (a Hugging Face model directory holds config.json and "
                              "*.safetensors)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ConversionError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    return config


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                              "checkpoints are read; convert pytorch_model.bin with transformers first)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def load(path: str, scan_layers: bool = True) -> tuple[ModelConfig, dict]:
    """(ModelConfig, parameters as float32 numpy) from a Hugging Face model directory."""
    hf = read_config(path)
    try:
        cfg = config_from_hf(hf, os.path.join(path, "config.json"))
    except KeyError as e:
        raise ConversionError(f"{os.path.join(path, 'config.json')} lacks the key {e} that its architecture "
                              "needs") from None
    if not scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=False)
    return cfg, params_from_hf(cfg, read_tensors(path), path)


def save(cfg: ModelConfig, params: dict, path: str) -> None:
    """A directory transformers loads: config.json and model.safetensors (float32)."""
    hf = config_to_hf(cfg)
    tensors = params_to_hf(cfg, params)
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    atomic_write_json(os.path.join(path, "config.json"), hf)
