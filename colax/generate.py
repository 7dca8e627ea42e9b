"""Sampling from a trained model: full recompute over a fixed-length buffer (no KV cache)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(1,))
def _fill(params, graphdef, tokens, start, temperature, key):
    """Fills tokens [1, L] from position `start` on, one token per full forward pass."""
    model = nnx.merge(graphdef, params)

    def body(i, carry):
        tokens, key = carry
        logits = model(tokens)[0, i - 1]
        key, sub = jax.random.split(key)
        sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits))
        return tokens.at[0, i].set(token.astype(tokens.dtype)), key

    tokens, _ = jax.lax.fori_loop(start, tokens.shape[1], body, (tokens, key))
    return tokens


def generate(params, graphdef, prompt_ids, length, eos_id, temperature=0.0, seed=0):
    """Token ids continuing `prompt_ids` (list of int): up to `length` - len(prompt) new ids, cut at EOS.

    Greedy if `temperature` is 0, else sampled from softmax(logits / temperature). The compiled
    function depends only on `length`, not on the prompt.
    """
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(prompt_ids)] = prompt_ids
    out = np.asarray(_fill(params, graphdef, jnp.asarray(tokens), len(prompt_ids),
                           jnp.float32(temperature), jax.random.key(seed)))[0, len(prompt_ids):]
    stop = np.flatnonzero(out == eos_id)
    return out[:stop[0]] if stop.size else out
