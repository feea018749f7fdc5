"""Sampling from a decoder with its KV cache, the whole decode loop compiled (one `lax.while_loop`).

Prompts of different lengths share one batch without padding masks: the common prefix (the shortest prompt)
is prefilled in one call, then every step feeds each row either its next prompt token (while it is still
inside its prompt) or the token just sampled for it. A row stops at EOS or after `max_tokens` new tokens;
the loop stops when every row has.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scalax.errors import ConfigError
from scalax.models import positions
from scalax.models.config import ModelConfig
from scalax.models.decoder import Decoder, init_cache


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B]: argmax when temperature is 0, else a draw from softmax(logits / temperature) restricted
    to the top_k tokens (0: all) and to the smallest set whose probability reaches top_p (1: all)."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep a token while the probability mass before it is below top_p (so at least the first is kept)
        keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "prefix", "max_tokens", "temperature", "top_k", "top_p"))
def _generate(cfg: ModelConfig, params, prompt_BxP, lengths_B, key, eos_id, prefix: int, max_tokens: int,
              temperature: float, top_k: int, top_p: float):
    B, P = prompt_BxP.shape
    total = P + max_tokens
    model = Decoder(cfg, decode=True)
    cache = init_cache(model, params, B, total)
    # Prefill the common prefix (the shortest prompt's length) in one call.
    logits, variables = model.apply({"params": params, "cache": cache}, prompt_BxP[:, :prefix], mutable=["cache"])
    out_BxN = jnp.zeros((B, total), jnp.int32).at[:, :prefix].set(prompt_BxP[:, :prefix])
    done_B = jnp.zeros((B,), bool)

    def cond(carry):
        t, _, _, _, done_B, _ = carry
        return (t < total) & ~jnp.all(done_B)

    def body(carry):
        t, cache, logits_BxV, out_BxN, done_B, key = carry
        key, step_key = jax.random.split(key)
        sampled_B = sample(logits_BxV, step_key, temperature, top_k, top_p)
        in_prompt_B = t < lengths_B
        token_B = jnp.where(in_prompt_B, prompt_BxP[:, jnp.minimum(t, P - 1)], sampled_B)
        token_B = jnp.where(done_B, 0, token_B)
        out_BxN = out_BxN.at[:, t].set(token_B)
        generated_B = t - lengths_B + 1  # new tokens of each row so far, this one included
        done_B = done_B | (~in_prompt_B & ((token_B == eos_id) | (generated_B >= max_tokens)))
        logits, variables = model.apply({"params": params, "cache": cache}, token_B[:, None], mutable=["cache"])
        return t + 1, variables["cache"], logits[:, -1], out_BxN, done_B, key

    carry = (jnp.int32(prefix), variables["cache"], logits[:, -1], out_BxN, done_B, key)
    t, _, _, out_BxN, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxN, t


def generate(cfg: ModelConfig, params, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (without the prompt; ending at and including EOS when it is sampled)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("--prompt", "every prompt needs at least one token")
    for name, value, ok, allowed in (("--max-tokens", max_tokens, max_tokens > 0, "a positive integer"),
                                     ("--temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
                                     ("--top-k", top_k, top_k >= 0, ">= 0 (0: all tokens)"),
                                     ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]")):
        if not ok:
            raise ConfigError(name, f"got {value}; allowed: {allowed}")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > cfg.max_seq_len:
        what = positions.scheme_of(cfg).context_name
        raise ConfigError("--max-tokens", f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds {what} "
                          f"(model.max_seq_len={cfg.max_seq_len}); allowed: at most {cfg.max_seq_len - longest}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ConfigError("--eos-id", f"{eos_id} is not a token of the model's vocabulary; allowed: 0 to "
                          f"{cfg.vocab_size - 1}")
    prompt_BxP = np.zeros((len(prompts), longest), np.int32)
    for i, p in enumerate(prompts):
        prompt_BxP[i, : len(p)] = p
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    out_BxN, _ = _generate(cfg, params, jnp.asarray(prompt_BxP), jnp.asarray(lengths_B), jax.random.key(seed),
                           jnp.int32(-1 if eos_id is None else eos_id), int(lengths_B.min()), max_tokens,
                           float(temperature), int(top_k), float(top_p))
    out_BxN = np.asarray(out_BxN)
    results = []
    for i, n in enumerate(lengths_B):
        new = out_BxN[i, n : n + max_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        results.append(new)
    return results
