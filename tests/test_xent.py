"""colax.xent: the lm_head fused with the token cross-entropy, chunked over the sequence, against
optax's cross-entropy of the whole logits (an independent reference: plain autodiff of x @ w)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from colax import xent


def _inputs(dtype, b=4, t=24, d=32, v=50):
    kx, kw, kt, km = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (b, t, d), jnp.float32).astype(dtype)
    w = (0.3 * jax.random.normal(kw, (d, v), jnp.float32)).astype(dtype)
    targets = jax.random.randint(kt, (b, t), 0, v)
    mask = (jax.random.uniform(km, (b, t)) > 0.3).astype(jnp.float32)
    return x, w, targets, mask


def _reference(x, w, targets, mask):
    """sum(mask * cross-entropy) of the logits as `Transformer._logits` forms them: x @ w in the
    compute dtype (accumulated in float32), then float32."""
    logits = jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    logits = logits.astype(x.dtype).astype(jnp.float32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask).sum()


@pytest.mark.parametrize("chunk_tokens", [1024, 32, 4])  # one chunk; 3 chunks of 8 positions; 24 of 1
def test_sequence_chunks_divide_the_length_within_the_budget(monkeypatch, chunk_tokens):
    monkeypatch.setattr(xent, "CHUNK_TOKENS", chunk_tokens)
    assert xent.sequence_chunk(4, 24) == {1024: 24, 32: 8, 4: 1}[chunk_tokens]


@pytest.mark.parametrize("chunk_tokens", [1024, 32, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_and_gradients_equal_autodiff_of_the_whole_logits(monkeypatch, dtype, chunk_tokens):
    """Value and gradients (times a cotangent of 0.37, which the backward must scale by) against
    jax.grad of `_reference`: float32 to 1e-5 relative of the largest entry; bfloat16 to 2^-7 (the
    fused path rounds the per-token gradients to bf16 before the cotangent scales them, autodiff
    after). Catches a dropped mask, a one-hot off by one, a wrong chunk order, an unscaled
    backward, and dw not summed over chunks."""
    monkeypatch.setattr(xent, "CHUNK_TOKENS", chunk_tokens)
    x, w, targets, mask = _inputs(dtype)
    scaled = lambda f: jax.jit(jax.value_and_grad(lambda x, w: 0.37 * f(x, w, targets, mask), (0, 1)))
    (got, got_grads), (want, want_grads) = scaled(xent.lm_head_loss)(x, w), scaled(_reference)(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6 if dtype == jnp.float32 else 1e-3)
    for g, r in zip(got_grads, want_grads):
        assert g.dtype == dtype and g.shape == r.shape
        r = np.asarray(r, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=0, atol=tol * np.abs(r).max())


def test_masked_tokens_give_no_loss_and_no_gradient():
    x, w, targets, mask = _inputs(jnp.float32)
    mask = mask.at[1].set(0.0)
    loss, (dx, _) = jax.value_and_grad(xent.lm_head_loss, (0, 1))(x, w, targets, mask)
    assert float(jnp.abs(dx[1]).max()) == 0.0
    shifted = (targets + 1) % w.shape[1]  # other targets only where the mask is 0
    assert float(xent.lm_head_loss(x, w, targets.at[1].set(shifted[1]), mask)) == pytest.approx(float(loss), rel=1e-7)
