"""`matmul(x, w)`: the model's projection matmul, x @ w in x's dtype.

On the CPU backend a bfloat16 x @ w runs as a bfloat16 dot that accumulates in float32 (then rounds
to bfloat16), forward and backward (a custom VJP). That is what XLA:CPU computes for a plain
bf16 x bf16 -> bf16 dot too, but jaxlib 0.10 does it by converting both operands to float32 and
running a float32 dot, while a bf16 x bf16 -> f32 dot runs natively (docs/cpu_performance.md). Other
dtypes and backends: a plain `x @ w`.
"""

import jax
import jax.numpy as jnp


def matmul(x, w):
    """x [..., I] @ w [I, O] -> [..., O], both in one dtype (the compute dtype), result in it."""
    if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return _bf16_matmul(x, w)
    return x @ w


def _dot32(a, b, contract):
    """bf16 dot_general contracting a's axes contract[0] with b's contract[1], accumulated in f32."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_matmul(x, w):
    return _dot32(x, w, ((x.ndim - 1,), (0,))).astype(x.dtype)


def _fwd(x, w):
    return _bf16_matmul(x, w), (x, w)


def _bwd(residuals, dy):
    """dx = dy @ w^T, dw = x^T @ dy over every leading axis, each a bf16 dot accumulated in f32."""
    x, w = residuals
    lead = tuple(range(x.ndim - 1))
    dx = _dot32(dy, w, ((dy.ndim - 1,), (1,))).astype(x.dtype)
    dw = _dot32(x, dy, (lead, lead)).astype(w.dtype)
    return dx, dw


_bf16_matmul.defvjp(_fwd, _bwd)
