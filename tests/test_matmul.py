"""colax.matmul: the projection matmul, whose bf16 path on CPU is a native bf16 dot accumulated in f32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colax.matmul import matmul


def _operands(dtype, lead, i, o):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (*lead, i), jnp.float32).astype(dtype)
    w = (0.1 * jax.random.normal(kw, (i, o), jnp.float32)).astype(dtype)
    dy = jax.random.normal(kg, (*lead, o), jnp.float32).astype(dtype)
    return x, w, dy


def _value_and_grads(f, x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


# The model's weight shapes: tall (ffn down, CoLA's A: dw as (dy^T x)^T), wide (ffn up/gate, CoLA's B,
# lm_head: dw as x^T dy) and square (dense q/k/v/o, the I == O tie: x^T dy), over [batch, length] and
# one leading axis; (172, 64) at 8 x 128 tokens is a dot XLA:CPU once failed to run in bf16
@pytest.mark.parametrize("lead, i, o", [((2, 24), 96, 40), ((2, 24), 40, 96), ((8, 128), 172, 64),
                                        ((2, 24), 64, 64), ((48,), 96, 96)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_and_its_gradients_equal_float32_products_rounded_once(dtype, lead, i, o):
    """y, dx, dw of `matmul` against the same products computed in float64 from the operands and
    rounded once to the dtype: fp32 to 2e-6 relative (plain x @ w), bf16 to one bf16 rounding
    (2^-8 relative of the largest entry). Catches a dropped or transposed backward dot, and a
    bf16 result rounded before the sum (relative error ~1e-2 on 96-term sums). Both ways of
    ordering the weight-gradient dot (the narrower operand transposed) are covered, and square
    weights, where a transposed dw has the right shape and only its values are wrong."""
    x, w, dy = _operands(dtype, lead, i, o)
    got = jax.jit(lambda x, w, dy: _value_and_grads(matmul, x, w, dy))(x, w, dy)
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    want = (x64 @ w64, dy64 @ w64.T, x64.reshape(-1, i).T @ dy64.reshape(-1, o))
    rtol = 2e-6 if dtype == jnp.float32 else 2.0 ** -8
    for g, r in zip(got, want):
        assert g.dtype == dtype and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=0, atol=rtol * np.abs(r).max())
