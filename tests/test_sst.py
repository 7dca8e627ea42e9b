"""SST (Sparse Spectral Training, Zhao et al., ICML 2025): the layer, the round's re-SVD hook, the
sampling distribution and the counts.

References are written here in numpy from the paper's formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colax import checkpoint, config, loop, model, optim
from colax.projections import common, sst
from colax.errors import ConfigError
from conftest import small_spec
from test_relora import compilation_cache, losses_and_lrs, micro_relora  # noqa: F401 (a fixture)

def effective_factors(p, layer):
    """numpy (U, s, V) of one layer of one projection's pure dict: the active columns written into U, V."""
    u, v = np.array(p["u"][layer]), np.array(p["v"][layer])
    idx = np.asarray(p["active"][layer])
    u[:, idx], v[:, idx] = p["u_active"][layer], p["v_active"][layer]
    return u, np.asarray(p["s"][layer]), v


def sst_state(seed=0):
    """(spec, graphdef, params, opt_state) of a tiny SST model: its active columns, s and Adam moments perturbed."""
    spec = small_spec(projection="sst")
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    noise = lambda x, scale: x + scale * jax.random.normal(next(keys), x.shape, x.dtype)
    for name in common.PROJECTION_NAMES:
        p = params["blocks"][name]
        p.update(u_active=noise(p["u_active"], 0.3), v_active=noise(p["v_active"], 0.3), s=noise(p["s"], 0.05))
    o = optim.defaults()
    o.update(warmup_steps=1)
    opt_state = optim.make(o, 100).init(params)
    random = lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return spec, graphdef, params, jax.tree.map(random, opt_state)


def test_sst_layer_starts_as_the_svd_of_its_init_and_computes_x_u_diag_s_vt():
    spec = small_spec(projection="sst")
    proj = sst.SST(32, 48, 8, spec, rngs=nnx.Rngs(1))
    u, s, v = (np.asarray(getattr(proj, n)[...]) for n in ("u", "s", "v"))
    idx = np.asarray(proj.active[...])
    assert u.shape == (32, 32) and v.shape == (48, 32) and idx.shape == (8,) and len(set(idx.tolist())) == 8
    np.testing.assert_allclose(u.T @ u, np.eye(32), atol=2e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(32), atol=2e-5)
    assert np.all(s[:-1] >= s[1:]) and s[-1] > 0  # singular values, sorted
    w0 = (u * s) @ v.T  # the init is N(0, 0.02): std of the entries and a Marchenko-Pastur-sized top value
    assert np.std(w0) == pytest.approx(0.02, rel=0.1) and s[0] == pytest.approx(0.02 * (32 ** .5 + 48 ** .5), rel=0.15)
    np.testing.assert_array_equal(proj.u_active[...], u[:, idx])
    np.testing.assert_array_equal(proj.v_active[...], v[:, idx])
    proj.u_active[...] = jax.random.normal(jax.random.key(3), (32, 8))  # the forward uses the active copies
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 32)))
    u2 = u.copy()
    u2[:, idx] = np.asarray(proj.u_active[...])
    np.testing.assert_allclose(proj(jnp.asarray(x)), x @ ((u2 * s) @ v.T), rtol=2e-5, atol=2e-5)


def test_sst_round_reorthonormalises_keeps_w_and_resets_exactly_the_active_state():
    spec, graphdef, params, opt_state = sst_state()
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, spec.vocab_size)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    before = forward(params)
    np_params, np_opt = jax.tree.map(np.asarray, (params, opt_state))
    new_params, new_opt = jax.jit(sst.sst_round)(jnp.int32(3), params, opt_state, jax.random.key(7))
    np.testing.assert_allclose(forward(new_params), before, rtol=1e-4, atol=1e-4)
    for name in common.PROJECTION_NAMES:
        old, new = np_params["blocks"][name], jax.tree.map(np.asarray, new_params["blocks"][name])
        for layer in range(2):
            u, s, v = effective_factors(old, layer)
            assert np.abs(u.T @ u - np.eye(u.shape[1])).max() > 0.05  # the trained columns broke orthonormality
            nu, ns, nv = new["u"][layer], new["s"][layer], new["v"][layer]
            np.testing.assert_allclose(nu.T @ nu, np.eye(nu.shape[1]), atol=1e-5)
            np.testing.assert_allclose(nv.T @ nv, np.eye(nv.shape[1]), atol=1e-5)
            assert np.all(ns[:-1] >= ns[1:]) and ns[-1] >= 0
            np.testing.assert_allclose((nu * ns) @ nv.T, (u * s) @ v.T, atol=2e-6)  # W unchanged
            idx = new["active"][layer]
            assert len(set(idx.tolist())) == idx.size and 0 <= idx.min() and idx.max() < ns.size
            np.testing.assert_array_equal(new["u_active"][layer], nu[:, idx])
            np.testing.assert_array_equal(new["v_active"][layer], nv[:, idx])
        assert not np.array_equal(new["active"], old["active"])  # resampled
    reset = 0
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(np_opt), jax.tree.leaves(new_opt), strict=True):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] in ("s", "u_active", "v_active") and keys[-2] in common.PROJECTION_NAMES:
            assert not np.any(np.asarray(new)) and np.any(old)
            reset += 1
        else:
            np.testing.assert_array_equal(new, old)
    assert reset == 2 * 3 * len(common.PROJECTION_NAMES)  # mu and nu of s, u_active, v_active per projection


def successive_inclusion(p, r):
    """Exact inclusion probabilities of r draws without replacement, each with probability
    proportional to p among the indices not drawn yet (enumerating the ordered draws)."""
    incl = np.zeros_like(p)

    def walk(prob, left, drawn):
        if len(drawn) == r:
            incl[list(drawn)] += prob
            return
        for i in left:
            walk(prob * p[i] / p[list(left)].sum(), left - {i}, drawn + (i,))

    walk(1.0, set(range(p.size)), ())
    return incl


@pytest.mark.parametrize("r", [1, 2])
def test_sst_sampling_follows_p(r):
    """p(i) = (1/m + s_i / sum s) / 2; with r = 1 the draw frequencies are p, with r = 2 the inclusion
    frequencies are the exact inclusion probabilities of successive draws without replacement.
    Pearson's chi-square over the m cells (r = 1; df = m - 1) and per-index binomial z-scores."""
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.0])
    m, n = s.size, 20000
    p = 0.5 * (1 / m + s / s.sum())
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sst.sst_sample(k, jnp.asarray(s, jnp.float32), r)))(
        jax.random.split(jax.random.key(0), n)))
    assert draws.shape == (n, r) and all(len(set(d)) == r for d in draws[:500])
    counts = np.bincount(draws.ravel(), minlength=m)
    want = successive_inclusion(p, r)
    if r == 1:
        np.testing.assert_allclose(want, p, rtol=1e-12)
        chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
        assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom
        uniform = ((counts - n / m) ** 2 / (n / m)).sum()
        assert uniform > 1000  # the test tells p from uniform sampling
    z = (counts / n - want) / np.sqrt(want * (1 - want) / n)
    assert np.abs(z).max() < 4, (counts / n, want)
    assert counts[-1] > 0  # s_i = 0 still has p = 1 / (2m)


def test_sst_parameter_and_optimizer_state_counts_by_hand():
    cfg = config.preset("sst", "60m")
    spec = config.validate(cfg)
    d, f, v, n_layers, r = 512, 1376, 32000, 8, 128
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    factors = sum((i + o) * min(i, o) + min(i, o) for i, o in shapes)  # U, V whole, s
    active = sum(r * (i + o) for i, o in shapes)
    spectrum = sum(min(i, o) for i, o in shapes)
    other = 2 * v * d + 2 * n_layers * d + d  # embed, lm_head, two norms per block, final norm
    counts = model.count_params(spec)
    assert counts["total"] == other + n_layers * (factors + active)
    assert counts["trainable"] == other + n_layers * (spectrum + active)  # U, V frozen
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))
    state = jax.eval_shape(optim.make(cfg.optim, cfg.train.steps).init, params)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * counts["trainable"] + 2  # mu, nu; two step counts


def test_sst_bad_config_is_one_line():
    cfg = config.preset("sst", "tiny")
    cfg.model.sst_round_steps = 0
    with pytest.raises(ConfigError, match="model.sst_round_steps"):
        config.validate(cfg)
    cfg.model.update(sst_round_steps=5, rank=129)  # tiny: hidden 128
    with pytest.raises(ConfigError, match="model.rank .* 128"):
        config.validate(cfg)


def test_sst_run_trains_only_the_active_columns_and_resumes_with_identical_losses(compilation_cache,  # noqa: F811
                                                                                 tmp_path_factory):
    """Rounds of 3 steps over 8: read from the per-step checkpoints, a step inside a round changes
    s and the active columns only (U, V and the indices stay), and the rounds after steps 3 and 6
    re-factor U, V and draw new indices. Stopped after step 4 (inside a round) and resumed, the losses
    equal the uninterrupted run's, also after the round that follows the resume (its new columns
    train in step 7, which shows in step 8's loss)."""
    cfg = micro_relora(tmp_path_factory)
    cfg.model.update(projection="sst", sst_round_steps=3)
    cfg.optim.update(schedule="cosine", full_rank_steps=0, restart_every=0)
    cfg.train.steps = 8
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, _ = losses_and_lrs(full)
    up = [jax.tree.map(np.asarray, checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]) for s in steps]
    changed = {s: {k for k in up[s - 1] if not np.array_equal(up[s - 2][k], up[s - 1][k])} for s in steps[1:]}
    inside, round_end = {"s", "u_active", "v_active"}, {"u", "s", "v", "u_active", "v_active", "active"}
    assert changed == {2: inside, 3: round_end, 4: inside, 5: inside, 6: round_end, 7: inside, 8: inside}
    assert loop.run(cfg, parts, stop_after=4) is None
    loop.run(cfg, parts)
    assert losses_and_lrs(parts)[0] == steps
    np.testing.assert_allclose(losses_and_lrs(parts)[1], losses, rtol=1e-6)
