"""Effective-rank measurements against spectra built by hand."""

import numpy as np
import pytest

from colax import analysis


def with_spectrum(s, n=50, seed=0):
    """An [n, len(s)] matrix U diag(s) V^T with orthonormal U, V."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(len(s), len(s))))
    return u @ np.diag(s) @ v.T


def test_singular_values_recovered():
    s = np.array([5.0, 3.0, 1.0, 0.5])
    np.testing.assert_allclose(analysis.singular_values(with_spectrum(s), center=False), s, rtol=1e-10)


def test_energy_rank_by_hand():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1: cumulative 9/14, 13/14, 14/14
    assert analysis.energy_rank(s, 0.5) == 1
    assert analysis.energy_rank(s, 0.9) == 2  # 13/14 = 0.929
    assert analysis.energy_rank(s, 0.95) == 3
    assert analysis.energy_rank(s, 1.0) == 3


def test_entropy_rank_flat_and_rank_one():
    assert analysis.entropy_rank(np.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert analysis.entropy_rank(np.array([7.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): exp(0.5 ln 2 + 0.5 ln 4) = 2^1.5
    assert analysis.entropy_rank(np.array([2.0, 1.0, 1.0])) == pytest.approx(2 ** 1.5)


def test_centering_removes_a_constant_offset():
    x = with_spectrum(np.array([1.0, 0.0, 0.0, 0.0]), seed=1) + 10.0
    assert analysis.energy_rank(analysis.singular_values(x, center=False), 0.9) == 1
    centred = analysis.singular_values(x)
    assert centred[1] < 1e-8 * centred[0]


def test_rank_summary_of_low_rank_activations_in_batches():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 32, 3)) @ rng.normal(size=(3, 16))  # [B, T, D=16], rank 3
    summary = analysis.rank_summary(x)
    assert summary["dim"] == 16
    assert summary["energy_rank_90"] <= 3 and summary["energy_rank_95"] <= 3
    assert 1.0 < summary["entropy_rank"] < 3.5


def test_projection_activations_are_the_projection_outputs():
    import jax
    from flax import nnx

    from colax import model
    from conftest import small_spec

    spec = small_spec(projection="dense", rank=0)
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    p = nnx.to_pure_dict(state)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, spec.vocab_size)
    acts = analysis.projection_activations(p, graphdef, tokens)
    assert acts["q"]["y"].shape == (2, 2, 7, 32) and acts["up"]["y"].shape == (2, 2, 7, 48)
    # Layer 0's q projection by hand: RMSNorm of the embeddings, then x @ W_q.
    x = np.asarray(p["embed"])[np.asarray(tokens)]
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps) * np.asarray(p["blocks"]["attn_norm"]["weight"][0])
    np.testing.assert_allclose(acts["q"]["y"][0], h @ np.asarray(p["blocks"]["q"]["w"][0]), rtol=1e-4, atol=1e-5)
    rows = analysis.rank_table(acts)
    assert len(rows) == 7 * spec.num_layers
    assert {r["projection"] for r in rows} == {"q", "k", "v", "o", "gate", "up", "down"}

    cola = small_spec()
    graphdef, state = nnx.split(model.Transformer(cola, rngs=nnx.Rngs(0)))
    acts = analysis.projection_activations(nnx.to_pure_dict(state), graphdef, tokens)
    assert acts["down"]["z"].shape == (2, 2, 7, 8)
    assert all(r["dim"] == 8 for r in analysis.rank_table(acts, "z"))
