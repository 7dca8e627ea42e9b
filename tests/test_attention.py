"""colax.attention.causal_attention against jax.nn.dot_product_attention (its XLA implementation):
the output and the gradients of q, k, v, causal, with and without packed segments.

Tolerances: float32 1e-5 of the largest entry (the same sums in another order); bfloat16 2^-7 of it
(both round the probabilities or the weights to bf16 before the value product, at different places).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colax import layers
from colax.attention import causal_attention

B, T, N, H = 2, 12, 3, 8
TOL = {"float32": 1e-5, "bfloat16": 2.0 ** -7}


def inputs(dtype, seed=0):
    q, k, v, w = (jax.random.normal(key, (B, T, N, H), jnp.float32)
                  for key in jax.random.split(jax.random.key(seed), 4))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def value_and_grads(fn, q, k, v, w):
    """(output, (dq, dk, dv)) of the loss sum(fn(q, k, v) * w), all float32."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = fn(q, k, v).astype(jnp.float32)
    return out, tuple(g.astype(jnp.float32) for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


def segment_mask(segment_ids):
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


SEGMENTS = np.array([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12], np.int32)  # row 0: three packed documents


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["one_document", "packed"])
def test_matches_jax_attention(dtype, segments):
    q, k, v, w = inputs(dtype)
    mask = None if segments is None else segment_mask(jnp.asarray(segments))
    ours = value_and_grads(lambda q, k, v: causal_attention(q, k, v, mask), q, k, v, w)
    ref = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation="xla"), q, k, v, w)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (ref[0], *ref[1])):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, atol=TOL[dtype] * scale, rtol=0, err_msg=f"{name} {dtype}")


def test_packed_segments_do_not_see_each_other():
    """A change to the first document's values leaves the later documents' outputs as they were."""
    q, k, v, _ = inputs("float32")
    mask = segment_mask(jnp.asarray(SEGMENTS))
    before = causal_attention(q, k, v, mask)
    after = causal_attention(q, k, v.at[0, :5].add(1.0), mask)
    np.testing.assert_array_equal(before[0, 5:], after[0, 5:])
    assert not np.allclose(before[0, :5], after[0, :5])


def test_layers_use_it_on_cpu_unless_an_implementation_is_named(monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "causal_attention", lambda *a: calls.append(a) or a[2])
    q, k, v, _ = inputs("float32")
    layers.attention(q, k, v, None, "")
    assert len(calls) == (1 if jax.default_backend() == "cpu" else 0)
    layers.attention(q, k, v, None, "xla")
    assert len(calls) == (1 if jax.default_backend() == "cpu" else 0)
