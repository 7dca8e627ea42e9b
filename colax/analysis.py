"""Effective rank of activations: the observation CoLA rests on, measurable on any checkpoint.

For activations X [N, D] (N tokens), the singular values s_1 >= ... >= s_min(N,D) of the centred
matrix give:
- the energy rank at fraction f: the smallest k with sum_{i<=k} s_i^2 >= f * sum_i s_i^2;
- the entropy effective rank (Roy & Vetterli, 2007): exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j.

`projection_activations` runs a model and returns what its projections sow: every projection's
output "y" [L, B, T, out] and, for CoLA, its bottleneck pre-activation "z" [L, B, T, r].
"""

import functools

import jax
import numpy as np
from flax import nnx


def singular_values(x, center=True):
    """Singular values (float64, descending) of activations x [..., D], flattened to [N, D]."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    return np.linalg.svd(x, compute_uv=False)


def energy_rank(s, fraction=0.9):
    """Smallest k whose top-k singular values hold `fraction` of the energy sum(s^2)."""
    energy = np.cumsum(np.square(s))
    return int(np.searchsorted(energy, fraction * energy[-1] * (1 - 1e-12)) + 1)


def entropy_rank(s):
    """exp(entropy) of the normalised singular values (1 for rank one, D for a flat spectrum)."""
    p = np.asarray(s, np.float64) / np.sum(s)
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def rank_summary(x, fractions=(0.9, 0.95)):
    """{"dim", "entropy_rank", "energy_rank_90", ...} of activations x [..., D]."""
    s = singular_values(x)
    summary = dict(dim=int(np.shape(x)[-1]), entropy_rank=entropy_rank(s))
    summary.update({f"energy_rank_{round(f * 100)}": energy_rank(s, f) for f in fractions})
    return summary


@functools.partial(jax.jit, static_argnums=(1,))
def _capture(params, graphdef, tokens):
    return nnx.merge(graphdef, params)(tokens, capture=True)[1]


def projection_activations(params, graphdef, tokens):
    """{projection: {"y" | "z": float32 numpy [L, B, T, width]}} of the model on tokens int32 [B, T]."""
    acts = _capture(params, graphdef, tokens)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), acts)


def rank_table(acts, value="y", fractions=(0.9, 0.95)):
    """One row per (layer, projection): `rank_summary` of acts[projection][value][layer]."""
    rows = []
    for name, values in acts.items():
        if value in values:
            for layer, x in enumerate(values[value]):
                rows.append(dict(layer=layer, projection=name, **rank_summary(x, fractions)))
    return rows
