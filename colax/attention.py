"""`causal_attention`: training attention on the CPU backend, a custom VJP in the flash-attention form.

`jax.nn.dot_product_attention` (its XLA implementation) keeps the [B, N, T, T] probabilities of every
layer for the backward pass and, on jaxlib 0.10's CPU backend, runs its bf16 dots as f32 dots with
both operands converted. Here the forward keeps only q, k, v, the output and each query's log-sum-exp
[B, N, T]; the backward recomputes the probabilities from q and k (one more [T, H] x [H, T] dot per
head) and forms dq, dk, dv as FlashAttention-2's backward does (Dao 2023, algorithm 2, without the
tiling: XLA:CPU runs each dot whole). Every dot takes the operands in their dtype and accumulates
in float32 (native bf16 dots on the CPU); the softmax is in float32 as jax's.

Measured on the 2-core CPU at 60M, 8 x 256 (docs/cpu_performance.md): the training step 8-12 %
faster in fp32 and 11-16 % in bf16 (full-rank, CoLA). `tests/test_attention.py` checks it
against `jax.nn.dot_product_attention` (value and gradients, fp32 and bf16, packed segments).
"""

import jax
import jax.numpy as jnp


def _einsum(spec, a, b):
    """einsum of two operands in their dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _logits(q, k, mask):
    """Scaled q k^T, float32 [B, N, T, T]; -inf where a query may not attend (after it, or `mask` False)."""
    t = q.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))
    if mask is not None:
        allowed = allowed & mask
    return jnp.where(allowed, _einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5, -jnp.inf)


@jax.custom_vjp
def causal_attention(q, k, v, mask):
    """Causal softmax(q k^T / sqrt(H)) v. q, k, v: [B, T, N, H] one dtype; mask: bool [B, 1, T, T]
    (True: may attend; e.g. same packed segment) or None -> [B, T, N, H] in q's dtype.

    Every query attends at least to itself, so no row of the softmax is empty."""
    return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
    logits = _logits(q, k, mask)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, N, T, 1]
    out = _einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v) / jnp.swapaxes(total, 1, 2)
    out = out.astype(q.dtype)
    return out, (q, k, v, mask, out, peak + jnp.log(total))


def _backward(residuals, dout):
    q, k, v, mask, out, lse = residuals
    probs = jnp.exp(_logits(q, k, mask) - lse)  # [B, N, T, T] float32
    dv = _einsum("bnts,btnh->bsnh", probs.astype(dout.dtype), dout)
    dprobs = _einsum("btnh,bsnh->bnts", dout, v)
    # softmax's backward: d logits = P * (dP - rowsum(dO * O)), then the 1/sqrt(H) scale
    row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # [B, T, N, 1]
    dlogits = (probs * (dprobs - jnp.swapaxes(row, 1, 2)) * q.shape[-1] ** -0.5).astype(q.dtype)
    dq = _einsum("bnts,bsnh->btnh", dlogits, k)
    dk = _einsum("bnts,btnh->bsnh", dlogits, q)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_attention.defvjp(_forward, _backward)
