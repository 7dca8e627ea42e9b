"""Remat policies: same gradients under every policy; CoLA-M saves exactly the tagged values.

Sizes are all distinct so a saved value's shape says what it is: batch 3, length 10, hidden 24,
2 heads of 12, rank 6, intermediate 40, vocab 64.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_spec
from flax import nnx

from colax import config, model, plan, remat, step
from colax.errors import ConfigError

B, T, D, N, R, F = 3, 10, 24, 2, 6, 40


def _spec(**overrides):
    return small_spec(hidden_size=D, intermediate_size=F, num_heads=N, rank=R, **overrides)


def _grads(spec):
    graphdef, params = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, spec.vocab_size)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, axis=1), loss_mask=jnp.ones((B, T)))
    loss_fn = lambda p: step.loss_sums(p, graphdef, batch)[0]
    return jax.jit(jax.grad(loss_fn))(params)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("projection", ["cola", "dense"])
def test_every_policy_gives_the_same_gradients(projection, scan_layers):
    names = [n for n, p in remat.POLICIES.items() if (projection == "cola" or not p.lowrank) and not p.inverts]
    grads = {n: _grads(_spec(projection=projection, scan_layers=scan_layers, remat=n)) for n in names}
    for name in names[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads[name], grads["none"])


def _saved(name, projection="cola", **overrides):
    """{(shape, source): count} of what one block saves under policy `name`."""
    rows = plan.saved_per_block(_spec(projection=projection, remat=name, **overrides), B, T)
    return collections.Counter((tuple(r["shape"]), r["source"]) for r in rows)


@pytest.mark.parametrize("name,tag", [("cola_m", "cola_z"), ("cola_m_paper", "cola_h")])
def test_cola_m_saves_exactly_block_inputs_and_seven_rank_wide_values(name, tag):
    assert _saved(name) == {((B, T, D), "block_in"): 1, ((B, T, D), "block_mid"): 1, ((B, T, R), tag): 7}


def test_full_saves_only_the_block_input():
    for projection in ("cola", "dense"):
        assert _saved("full", projection) == {((B, T, D), "argument x"): 1}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="colax.attention is the CPU backend's default")
def test_none_saves_intermediate_size_and_attention_probabilities_only_with_jax_attention():
    """Under `none` the MLP's F-wide values are kept; colax.attention keeps each query's log-sum-exp
    [B, N, T, 1] where jax's XLA attention keeps [T, T] probabilities."""
    shapes = [shape for shape, _ in _saved("none")]
    assert any(shape[-1:] == (F,) for shape in shapes)
    assert (B, N, T, 1) in shapes and not any(shape[-2:] == (T, T) for shape in shapes)
    assert any(shape[-2:] == (T, T) for shape, _ in _saved("none", attention_impl="xla"))


def test_per_token_formula():
    spec = _spec(remat="cola_m")
    saved = plan.saved_per_block(spec, B, T)
    assert plan.per_token(spec, saved, B, T) == (2 * D + 7 * R, "2d+7r")


def test_cola_m_on_full_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a low-rank projection"):
        plan.remat_row(config.preset("llama", "tiny"), "cola_m")


@pytest.mark.slow
def test_cola_m_at_1b_paper_micro_batch_memory_and_flops():
    # configs/cola_1b.py at 32 x 256, bf16 (measured on CPU: temp 0.256x, FLOPs 1.130x of none).
    cfg = config.preset("cola", "1b")
    rows = {name: plan.remat_row(cfg, name) for name in ("none", "full", "cola_m")}
    flops = {name: row["xla_flops_per_step"] / (32 * 256) for name, row in rows.items()}
    assert rows["cola_m"]["temp_bytes"] <= 0.35 * rows["none"]["temp_bytes"]
    assert flops["cola_m"] <= 1.2 * flops["none"]
    assert flops["cola_m"] < flops["full"]
    # Full-rank 1B needs more than this even without recomputation (analytic 3 x forward).
    assert flops["cola_m"] < model.flops_per_token(config.validate(config.preset("llama", "1b")), 256)["train"]


def _grads_with_key(spec, packs):
    """Parameter gradients with a dropout key, scanned blocks' residuals packed (`packs`) or not."""
    graphdef, params = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, spec.vocab_size)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, axis=1), loss_mask=jnp.ones((B, T)))
    key = jax.random.key(2) if model.uses_rng(spec) else None
    grad = jax.grad(lambda p: step.loss_sums(p, graphdef, batch, key=key)[0])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "_packs_residuals", lambda s: packs)
        jaxpr = str(jax.make_jaxpr(grad)(params))
        return jax.jit(grad)(params), "uint16" in jaxpr


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="residuals are packed on the CPU backend")
@pytest.mark.parametrize("projection, extra", [("cola", {}), ("dense", {}), ("lora", dict(lora_dropout=0.5))])
def test_packed_bf16_residuals_give_the_same_gradients(projection, extra):
    """remat.packed_residuals (bf16 residuals of scanned blocks kept as uint16 bits, the CPU backend's
    default) against jax's own autodiff of the same blocks: the same gradients, to bf16 rounding of
    sums XLA may order differently (2^-8 of each gradient's largest entry)."""
    spec = _spec(projection=projection, dtype="bfloat16", **extra)
    assert model._packs_residuals(spec)
    packed, packs = _grads_with_key(spec, True)
    plain, plain_packs = _grads_with_key(spec, False)
    assert packs and not plain_packs
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2**-8 * float(np.abs(b).max()) + 1e-12),
                 packed, plain)
