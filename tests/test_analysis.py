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
