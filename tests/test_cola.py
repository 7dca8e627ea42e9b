"""CoLA against its authors' code (tests/official/cola.py, alvin-zyl/CoLA@91ff0d1): the tiny model's
logits with the same weights, moved over by colax.convert's `cola` layout, and the factors' init."""

import jax
import numpy as np
import pytest
from flax import nnx

from colax import convert, model
from colax.projections import cola
from conftest import authors_package, small_spec
from official import cola as official


@pytest.mark.parametrize("only_lr_act", [False, True])
def test_logits_equal_the_authors_forward(only_lr_act):
    """fp32 logits of a 2-layer model (d 32, 4 heads, rank 8) to 1e-5: the authors' forward on the
    weights colax.convert exports in their layout (silu inside every projection, SiLU on the gate
    unless only_lr_act, RoPE, RMSNorm, untied lm_head)."""
    torch = authors_package("torch")
    spec = small_spec(projection="cola", only_lr_act=only_lr_act)
    transformer = model.Transformer(spec, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 12), 0, spec.vocab_size))
    ours = np.asarray(transformer(tokens))
    weights = {k: torch.from_numpy(np.array(v)) for k, v in
               convert.to_tensors(nnx.to_pure_dict(nnx.state(transformer)), "cola").items()}
    theirs = official.forward(torch, weights, torch.from_numpy(tokens.copy()).long(), spec.num_layers, spec.num_heads,
                              only_lr_act, eps=spec.norm_eps, theta=spec.rope_theta).numpy()
    assert np.abs(ours).max() > 0.1  # not a vanishing output that would match anything
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_factor_init_is_the_authors():
    """A and B are N(0, r^-1/4 (in + out)^-1/4) as ColaLayer draws them: the sample std of colax's
    factors and of the authors' draw agree to 2 % on a 512 x 1376, rank 128 layer (60M's gate)."""
    torch = authors_package("torch")
    n_in, n_out, rank = 512, 1376, 128
    cfg = small_spec(projection="cola")
    ours = cola.CoLA(n_in, n_out, rank, cfg, rngs=nnx.Rngs(0))
    a, b = official.init_factors(torch, n_in, n_out, rank, torch.Generator().manual_seed(0))
    for mine, theirs in ((ours.A[...], a), (ours.B[...], b)):
        assert mine.shape == tuple(theirs.shape)
        assert float(np.std(mine)) == pytest.approx(float(theirs.std()), rel=0.02)
