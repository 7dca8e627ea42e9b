"""The training loss: token cross-entropy of the lm_head's logits, fused with the lm_head.

`lm_head_loss(x, w, targets, mask)` is sum(mask * cross_entropy(x @ w, targets)) without the
[B, T, V] logits ever being whole: it runs over chunks of the sequence, and under differentiation
(a custom VJP) each chunk's gradients are formed in the forward pass, while its logits are in
cache, and kept: dx [B, T, D] and dw [D, V], scaled by the incoming cotangent in the backward.
The loss is a sum over tokens with the mask applied inside, so that cotangent is one scalar.
The logits are the compute dtype's x @ w (as `Transformer._logits`) in float32.
"""

import functools

import jax
import jax.numpy as jnp

from colax import sharding
from colax.matmul import matmul, matmul_grads

CHUNK_TOKENS = 1024  # tokens per chunk (B x chunk of the sequence): [1024, 32000] float32 logits are 131 MB


def sequence_chunk(batch, length):
    """Positions per chunk: the largest divisor of `length` with batch x chunk <= CHUNK_TOKENS (1 at least)."""
    fits = [c for c in range(1, length + 1) if length % c == 0 and batch * c <= CHUNK_TOKENS]
    return max(fits, default=1)


def lm_head_loss(x, w, targets, mask):
    """float32 scalar: sum over tokens of mask * (logsumexp(logits) - logits[target]).

    x: [B, T, D] compute dtype (after the final norm); w: [D, V] same dtype; targets: int32 [B, T];
    mask: float32 [B, T]. Gradients flow to x and w only.
    """
    return _fused(x, w, targets, mask, sequence_chunk(*targets.shape))


def _by_chunk(a, chunk):
    """[B, T, ...] -> [T / chunk, B, chunk, ...]."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a):
    """The inverse of `_by_chunk`."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _chunk_loss(x, w, targets, mask):
    """(summed masked cross-entropy, logits float32 [B, c, V], logsumexp float32 [B, c]) of one chunk."""
    logits = sharding.constrain(matmul(x, w), ("batch", "length", "act_vocab")).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((lse - target) * mask).sum(), logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(x, w, targets, mask, chunk):
    def step(total, inputs):
        return total + _chunk_loss(inputs[0], w, *inputs[1:])[0], None

    chunks = tuple(_by_chunk(a, chunk) for a in (x, targets, mask))
    return jax.lax.scan(step, jnp.float32(0), chunks)[0]


def _fwd(x, w, targets, mask, chunk):
    """The loss, and per chunk dloss/dlogits = mask * (softmax - one_hot) through the lm_head:
    dx [B, T, D] in x's dtype, dw [D, V] accumulated in float32."""

    def step(carry, inputs):
        total, dw = carry
        xc, tc, mc = inputs
        loss, logits, lse = _chunk_loss(xc, w, tc, mc)
        one_hot = jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        dlogits = ((jnp.exp(logits - lse[..., None]) - one_hot) * mc[..., None]).astype(x.dtype)
        dxc, dwc = matmul_grads(xc, w, dlogits)
        return (total + loss, dw + dwc), dxc

    chunks = tuple(_by_chunk(a, chunk) for a in (x, targets, mask))
    dw0 = jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32))
    (total, dw), dx = jax.lax.scan(step, (jnp.float32(0), dw0), chunks)
    return total, (_unchunk(dx), dw.astype(w.dtype))


def _bwd(chunk, residuals, g):
    del chunk
    dx, dw = residuals
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, None


_fused.defvjp(_fwd, _bwd)
