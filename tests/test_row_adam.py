"""Adam with per-vector step counts (colax.row_adam): optax's Adam without resets; a reset vector
restarts as a fresh Adam (bias correction included), the others untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from colax import row_adam

B1, B2, EPS = 0.9, 0.999, 1e-8
AXES = {"a": -1, "b": -2}  # a [2, 3, 5]: one count per row; b [2, 5, 3]: one per column; c: per leaf


def tx():
    return row_adam.scale_by_row_adam(B1, B2, EPS, lambda keys: AXES.get(keys[-1]))


def grads(rng):
    return {"a": rng.standard_normal((2, 3, 5)).astype(np.float32),
            "b": rng.standard_normal((2, 5, 3)).astype(np.float32),
            "c": rng.standard_normal((4,)).astype(np.float32)}


def test_without_reset_it_is_optax_adam():
    """Five steps of random gradients: updates equal optax.scale_by_adam's (<= 1e-6 relative, fp32: one ulp
    where a per-vector bias correction is broadcast)."""
    rng = np.random.default_rng(0)
    ours, ref = tx(), optax.scale_by_adam(B1, B2, EPS)
    params = grads(rng)
    s, r = ours.init(params), ref.init(params)
    assert [c.shape for c in s.counts] == [(2, 3, 1), (2, 1, 3), (1,)]
    for _ in range(5):
        g = grads(rng)
        u, s = ours.update(g, s)
        v, r = ref.update(g, r)
        for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def test_reset_vectors_restart_as_fresh_adam_and_the_rest_is_untouched():
    """A constant gradient for 1000 steps, then rows 1 of a (axis -1) and column 2 of b (axis -2) reset:
    their next 10 updates equal a fresh Adam's on the same gradients (<= 1e-6; with the global count
    kept they would be 2.5-5.2x), the other vectors' equal an Adam never reset (<= 1e-6)."""
    rng = np.random.default_rng(1)
    g = grads(rng)
    t = tx()
    step = jax.jit(t.update)
    s = t.init(g)
    for _ in range(1000):
        _, s = step(g, s)
    mask_a = np.zeros((2, 3, 1), bool)
    mask_a[:, 1] = True
    mask_b = np.zeros((2, 1, 3), bool)
    mask_b[1, :, 2] = True
    masks = {"a": mask_a, "b": mask_b}
    reset = row_adam.reset((s, optax.EmptyState()), lambda keys: masks.get(keys[-1]))[0]
    fresh, kept = t.init(g), s
    for _ in range(10):
        u, reset = step(g, reset)
        f, fresh = step(g, fresh)
        k, kept = step(g, kept)
        for name, m in masks.items():
            m = np.broadcast_to(m, g[name].shape)
            np.testing.assert_allclose(u[name][m], f[name][m], rtol=1e-6)
            np.testing.assert_allclose(u[name][~m], k[name][~m], rtol=1e-6)
        np.testing.assert_allclose(u["c"], k["c"], rtol=1e-6)


def test_held_vectors_get_zero_updates_and_their_counts_still_grow():
    """Rows 0 of a reset with hold=2 after 50 steps: zero updates twice, then Adam's from zero moments
    at count 3 (numpy, <= 1e-5): m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected at step 3."""
    rng = np.random.default_rng(2)
    t = tx()
    s = t.init(grads(rng))
    for _ in range(50):
        _, s = t.update(grads(rng), s)
    mask = np.zeros((2, 3, 1), bool)
    mask[:, 0] = True
    s = row_adam.reset(s, lambda keys: mask if keys[-1] == "a" else None, hold=2)
    for k in range(3):
        g = grads(rng)
        u, s = t.update(g, s)
        x = g["a"][:, 0]
        want = np.zeros_like(x) if k < 2 else ((1 - B1) * x / (1 - B1 ** 3)) / (
            np.sqrt((1 - B2) * x * x / (1 - B2 ** 3)) + EPS)
        np.testing.assert_allclose(u["a"][:, 0], want, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(s.counts[0][:, :, 0], [[3, 53, 53]] * 2)
