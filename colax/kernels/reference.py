"""Plain-jnp CoLA projection: the reference the Pallas kernel is tested against, and its backward.

Shapes: N tokens, I input features, R rank, O output features. Every function is dtype-preserving:
inputs share one dtype (float32 or bfloat16) and so do the results.
"""

import jax
import jax.numpy as jnp


def cola_reference(x, a, b):
    """(y, h) with h = silu(x @ A) and y = h @ B. x: [N, I], A: [I, R], B: [R, O] -> [N, O], [N, R]."""
    h = jax.nn.silu(x @ a)
    return h @ b, h


def silu_matmul_reference(z, b):
    """silu(z) @ B, the part of the projection the kernel fuses. z: [N, R], B: [R, O] -> [N, O]."""
    return jax.nn.silu(z) @ b


def silu_matmul_bwd(z, b, dy):
    """(dz, dB) of y = silu(z) @ B for cotangent dy [N, O], recomputing silu(z) and silu'(z) from z.

    dh = dy @ B^T, dz = dh * silu'(z) with silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z), and
    dB = silu(z)^T @ dy. Elementwise work runs in float32; matmuls accumulate in float32.
    """
    z32 = z.astype(jnp.float32)
    s = jax.nn.sigmoid(z32)
    dh = jnp.dot(dy, b.T, preferred_element_type=jnp.float32)
    dz = (dh * s * (1 + z32 * (1 - s))).astype(z.dtype)
    db = jnp.dot((z32 * s).astype(z.dtype).T, dy, preferred_element_type=jnp.float32).astype(b.dtype)
    return dz, db
