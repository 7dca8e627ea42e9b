"""SST (Sparse Spectral Training, Zhao et al., ICML 2025): the layer and its enhanced gradient, the
hook (projection, resampling, re-SVD) against the transcription of the paper's update in
tests/official/sst.py over a round, the sampler against torch.multinomial, the preset and the counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from colax import checkpoint, config, hooks, loop, model, optim, schedules
from colax.projections import common, sst
from colax.errors import ConfigError
from conftest import authors_package, small_spec
from official import sst as official
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


def test_sst_gradient_is_the_papers_enhanced_gradient():
    """Through the layer's forward (jax.grad of a loss on x W), s gets diag(U'ᵀ G V') and the active
    vectors G V_a and Gᵀ U_a (paper section 4.2), G = xᵀ dL/dy in numpy: the true gradient's factor
    s_i is not there (checked against it too)."""
    spec = small_spec(projection="sst")
    proj = sst.SST(12, 20, 4, spec, rngs=nnx.Rngs(0))
    u, s, v, u_a, v_a, idx = (np.asarray(getattr(proj, n)[...]) for n in ("u", "s", "v", "u_active", "v_active", "active"))
    u_a, v_a = u_a * 1.3, v_a * 0.7 + 0.01  # trained copies: no longer the columns of U, V
    x, dy = (np.asarray(jax.random.normal(jax.random.key(k), shape)) for k, shape in ((1, (3, 5, 12)), (2, (3, 5, 20))))
    loss = lambda s, u_a, v_a: jnp.sum(sst.sst_matmul(jnp.asarray(x), u, s, v, u_a, v_a, idx) * dy)
    g_s, g_u, g_v = jax.grad(loss, argnums=(0, 1, 2))(s, u_a, v_a)
    g = np.einsum("bti,bto->io", x, dy)  # dL/dW
    u2, v2 = u.copy(), v.copy()
    u2[:, idx], v2[:, idx] = u_a, v_a
    np.testing.assert_allclose(g_s, np.diag(u2.T @ g @ v2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_u, g @ v_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_v, g.T @ u_a, rtol=1e-5, atol=1e-5)
    assert np.abs(g_u - g @ v_a * s[idx]).max() > 0.1 * np.abs(g_u).max()  # not the true gradient


def official_run(steps, iteration_steps, round_iterations, init_std):
    """(colax states, reference layers per step) of one model's seven projections (2 layers each,
    [8, 8] / [8, 12] / [12, 8], r = 3) trained on a least-squares loss by colax (`sst_weight`'s
    gradient, `optim.make`'s AdamW on the jagged cosine, `sst.sst_step` after every step) and by
    tests/official/sst.py from the same initial factors (W0 ~ N(0, init_std)), lrs and sampling draws."""
    spec = small_spec(projection="sst", init_std=init_std)
    shapes, layers, rank, rows = common.projection_shapes(8, 12), 2, 3, 16
    rngs = nnx.Rngs(0)
    blocks = {}
    for name in common.PROJECTION_NAMES:
        one = [nnx.to_pure_dict(nnx.state(sst.SST(*shapes[name], rank, spec, rngs=rngs))) for _ in range(layers)]
        blocks[name] = jax.tree.map(lambda *x: jnp.stack(x), *one)
    params = {"blocks": blocks}
    data = np.random.default_rng(0)
    xy = {name: (data.normal(size=(layers, rows, n_in)), data.normal(size=(layers, rows, n_out)))
          for name, (n_in, n_out) in shapes.items()}
    o = optim.defaults()
    o.update(lr=0.01, warmup_steps=1, grad_clip=0.0, schedule="jagged_cosine", restart_every=iteration_steps,
             restart_warmup_steps=2)
    tx = optim.make(o, steps)
    trained = ("s", "u_active", "v_active")

    def loss(t, params):
        total = 0.0
        for name, (x, y) in xy.items():
            p = dict(params["blocks"][name], **t[name])
            w = jax.vmap(sst.sst_weight)(*(p[k] for k in ("u", "s", "v", "u_active", "v_active", "active")))
            total += 0.5 * jnp.sum((jnp.einsum("lni,lio->lno", x, w) - y) ** 2) / rows
        return total

    @jax.jit
    def train_step(params, opt_state):
        g = jax.grad(loss)({n: {k: params["blocks"][n][k] for k in trained} for n in blocks}, params)
        g = {"blocks": {n: {k: g[n][k] if k in trained else jnp.zeros_like(x) for k, x in p.items()}
                        for n, p in params["blocks"].items()}}
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    hook = jax.jit(functools.partial(sst.sst_step, iteration_steps, iteration_steps * round_iterations))
    adam = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    ref = [official.Layer(*effective_factors(blocks[name], layer), blocks[name]["active"][layer], adam)
           for name in common.PROJECTION_NAMES for layer in range(layers)]

    def grad(j, w):  # dL/dW of reference layer j (projection j // layers, layer j % layers)
        x, y = (a[j % layers] for a in xy[common.PROJECTION_NAMES[j // layers]])
        return x.T @ (x @ w - y) / rows

    m = min(shapes["q"])

    def draws(t, j):  # the hook's Exp(1) draws after step t for reference layer j (`sst.sst_resample`)
        return np.asarray(sst.sst_draws(jax.random.fold_in(hooks.hook_key(0, t), j // layers), (layers, m)))[j % layers]

    lr = optim.schedule(o, steps)
    opt_state = tx.init(params)
    states = []
    for t in official.train(ref, grad, [float(lr(c)) for c in range(steps)], draws, iteration_steps, round_iterations):
        params, opt_state = train_step(params, opt_state)
        params, opt_state = hook(jnp.int32(t), params, opt_state, hooks.hook_key(0, t))
        states.append((jax.tree.map(np.asarray, params["blocks"]),
                       [(l.u.copy(), l.sigma.copy(), l.v.copy(), l.active.copy()) for l in ref]))
    return states


@pytest.mark.parametrize("init_std,round_iterations", [(0.3, 2), (0.02, 9)])
def test_sst_matches_the_transcription_of_the_papers_update(init_std, round_iterations):
    """Iterations of 3 steps over 8 steps: new samples after steps 3 and 6, the new vectors trained
    in the steps after them. With rounds of 2 iterations (init N(0, 0.3): s far from 0) the re-SVD
    after step 6; with small singular values (init N(0, 0.02)) and no re-SVD in the run, s clamped at
    0 (the reference's s has zeros: a zero singular value's vectors are not unique, so these runs do
    not cross a re-SVD). After every step each layer's s, U and V (active vectors written in; a
    column's sign is the SVD's choice, so each column pair is compared up to one sign) equal the
    reference's within 1e-5 and the indices exactly."""
    states = official_run(8, 3, round_iterations, init_std)
    worst, clamped = 0.0, 0
    for t, (blocks, ref) in enumerate(states, start=1):
        for j, (u_ref, s_ref, v_ref, idx_ref) in enumerate(ref):
            p = blocks[common.PROJECTION_NAMES[j // 2]]
            u, s, v = effective_factors(p, j % 2)
            np.testing.assert_array_equal(p["active"][j % 2], idx_ref, err_msg=f"step {t}, layer {j}")
            sign = np.sign(np.sum(u * u_ref, axis=0))
            err = max(np.abs(s - s_ref).max(), np.abs(u * sign - u_ref).max(), np.abs(v * sign - v_ref).max())
            assert err <= 1e-5, (t, j, err)
            worst, clamped = max(worst, err), clamped + int(np.sum(s_ref == 0))
    assert (clamped > 0) == (init_std == 0.02)
    changes = [t for t in range(2, 9) if not np.array_equal(states[t - 2][0]["q"]["active"], states[t - 1][0]["q"]["active"])]
    assert changes == [3, 6]
    print(f"max |colax - reference| over 8 steps (init_std {init_std}): {worst:.2e}")


def test_sst_sampler_is_torch_multinomial_without_replacement():
    """The reference's `multinomial` (top r of p / q) is torch.multinomial(p, r, replacement=False)
    given the same generator's Exp(1) draws, and colax's `sst_sample` equals it on the same draws."""
    torch = authors_package("torch")
    s = np.abs(np.random.default_rng(1).normal(size=40))
    p = torch.tensor(official.probabilities(s))
    for seed in range(20):
        q = torch.empty_like(p).exponential_(1, generator=torch.Generator().manual_seed(seed))
        want = torch.multinomial(p, 6, replacement=False, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(official.multinomial(p.numpy(), q.numpy(), 6), want)
        got = sst.sst_sample(jnp.asarray(q.numpy(), jnp.float32), jnp.asarray(s, jnp.float32), 6)
        np.testing.assert_array_equal(got, want)


def test_sst_resample_writes_back_draws_new_vectors_and_resets_their_moments():
    """A new iteration (`sst_resample`, refactor False) writes the active vectors back, changes no
    other entry of U, s, V, draws the indices the reference's sampler draws from the same Exp(1)
    draws and zeroes exactly the moments of u_active and v_active; a new round (True) also re-factors
    W (U, V orthonormal, W and the model's output unchanged) and zeroes s's moments."""
    spec, graphdef, params, opt_state = sst_state()
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, spec.vocab_size)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    before = forward(params)
    np_params, np_opt = jax.tree.map(np.asarray, (params, opt_state))
    for refactor in (False, True):
        key = jax.random.key(7)
        new_params, new_opt = jax.jit(functools.partial(sst.sst_resample, refactor, key))(params, opt_state)
        np.testing.assert_allclose(forward(new_params), before, rtol=1e-4, atol=1e-4)
        for i, name in enumerate(common.PROJECTION_NAMES):
            old, new = np_params["blocks"][name], jax.tree.map(np.asarray, new_params["blocks"][name])
            q = np.asarray(sst.sst_draws(jax.random.fold_in(key, i), new["s"].shape))
            for layer in range(2):
                u, s, v = effective_factors(old, layer)
                nu, ns, nv = new["u"][layer], new["s"][layer], new["v"][layer]
                if refactor:
                    assert np.abs(u.T @ u - np.eye(u.shape[1])).max() > 0.05  # the trained vectors broke orthonormality
                    np.testing.assert_allclose(nu.T @ nu, np.eye(nu.shape[1]), atol=1e-5)
                    np.testing.assert_allclose(nv.T @ nv, np.eye(nv.shape[1]), atol=1e-5)
                    assert np.all(ns[:-1] >= ns[1:]) and ns[-1] >= 0
                    np.testing.assert_allclose((nu * ns) @ nv.T, (u * s) @ v.T, atol=2e-6)  # W unchanged
                else:
                    for got, want in ((nu, u), (ns, s), (nv, v)):
                        np.testing.assert_array_equal(got, want)  # written back, nothing else changed
                idx = new["active"][layer]
                np.testing.assert_array_equal(idx, official.multinomial(official.probabilities(ns), q[layer], idx.size))
                np.testing.assert_array_equal(new["u_active"][layer], nu[:, idx])
                np.testing.assert_array_equal(new["v_active"][layer], nv[:, idx])
            assert not np.array_equal(new["active"], old["active"])  # resampled
        zeroed = {"s", "u_active", "v_active"} if refactor else {"u_active", "v_active"}
        reset = 0
        for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(np_opt), jax.tree.leaves(new_opt), strict=True):
            keys = [getattr(k, "key", None) for k in path]
            if keys[-1] in zeroed and keys[-2] in common.PROJECTION_NAMES:
                assert not np.any(np.asarray(new)) and np.any(old)
                reset += 1
            else:
                np.testing.assert_array_equal(new, old)
        assert reset == 2 * len(zeroed) * len(common.PROJECTION_NAMES)  # mu and nu of each per projection


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
    sample = lambda k: sst.sst_sample(sst.sst_draws(k, s.shape), jnp.asarray(s, jnp.float32), r)
    draws = np.asarray(jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(0), n)))
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
    d, f, v, n_layers, r = 512, 1376, 32000, 8, 64
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    factors = sum((i + o) * min(i, o) + min(i, o) for i, o in shapes)  # U, V whole, s
    active = sum(r * (i + o) for i, o in shapes)
    spectrum = sum(min(i, o) for i, o in shapes)
    other = 2 * v * d + 2 * n_layers * d + d  # embed, lm_head, two norms per block, final norm
    counts = model.count_params(spec)
    assert counts["total"] == other + n_layers * (factors + active)
    assert counts["trainable"] == other + n_layers * (spectrum + active)  # U, V frozen
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))
    state = jax.eval_shape(optim.make(cfg.optim, cfg.train.steps, projection="sst").init, params)
    # optax's Adam (SST asks for no per-vector step counts): mu, nu, one step count; the schedule's count
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * counts["trainable"] + 1 + 1


def test_sst_bad_config_is_one_line():
    cfg = config.preset("sst", "tiny")
    cfg.model.sst_round_iterations = 0
    with pytest.raises(ConfigError, match="model.sst_round_iterations"):
        config.validate(cfg)
    cfg.model.update(sst_round_iterations=2, rank=129)  # tiny: hidden 128
    with pytest.raises(ConfigError, match="model.rank .* 128"):
        config.validate(cfg)
    cfg.model.rank = 32
    cfg.optim.schedule = "cosine"  # SST's iterations are the jagged cosine's restarts
    with pytest.raises(ConfigError, match="^optim.schedule must be 'jagged_cosine' .* model.projection='sst'"):
        config.validate(cfg)


def test_sst_presets_are_the_papers_ranks_iterations_and_rounds():
    """Ranks 64 (130M, and the sizes the paper has no LLaMA run of) and 128 (1B); iterations of 200
    steps, each beginning with a 20-step re-warmup from lr 0; rounds of d / r iterations (appendix F.2)."""
    got = {size: config.preset("sst", size) for size in ("60m", "130m", "350m", "1b")}
    assert {size: (c.model.rank, c.model.sst_round_iterations) for size, c in got.items()} == {
        "60m": (64, 8), "130m": (64, 12), "350m": (64, 16), "1b": (128, 16)}
    o = got["130m"].optim
    assert (o.schedule, o.restart_every, o.restart_warmup_steps) == ("jagged_cosine", 200, 20)
    lr = optim.schedule(o, got["130m"].train.steps)
    base = schedules.cosine(o.lr, o.warmup_steps, got["130m"].train.steps, o.min_lr_ratio)
    # the update after a new iteration (count 4000: after step 4000) starts at 0 and is back on the cosine after 20
    np.testing.assert_allclose([lr(c) for c in (3999, 4000, 4010, 4020)],
                               [base(3999), 0.0, base(4020) / 2, base(4020)], rtol=1e-6)


def test_sst_run_resamples_per_iteration_refactors_per_round_and_resumes_with_identical_losses(
        compilation_cache, tmp_path_factory):  # noqa: F811
    """Iterations of 2 steps, rounds of 2 iterations, 8 steps, read from the per-step checkpoints:
    the indices change after every iteration (steps 2, 4, 6, 8); U changes in the previously active
    columns only at an iteration's end (2, 6: the write-back) and in every column at a round's end
    (4, 8: the re-SVD); the lr is 0 in the step after each (3, 5, 7: the re-warmup). Stopped after
    step 3 and resumed, the losses equal the uninterrupted run's through the rounds that follow."""
    cfg = micro_relora(tmp_path_factory)
    cfg.model.update(projection="sst", sst_round_iterations=2, lora_dropout=0.0)
    cfg.optim.update(full_rank_steps=0, restart_every=2, restart_warmup_steps=1, warmup_steps=0)
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, lrs = losses_and_lrs(full)
    assert steps == list(range(1, 9)) and [s for s, lr in zip(steps, lrs) if lr == 0] == [3, 5, 7]
    up = [jax.tree.map(np.asarray, checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]) for s in steps]
    resampled = [s for s in steps[1:] if not np.array_equal(up[s - 2]["active"], up[s - 1]["active"])]
    assert resampled == [2, 4, 6, 8]
    for s in (2, 4, 6, 8):
        before, after = up[s - 2], up[s - 1]
        changed = {int(c) for layer in range(2) for c in np.flatnonzero(np.any(before["u"][layer] != after["u"][layer], 0))}
        if s % 4:
            assert changed and changed <= set(before["active"].ravel().tolist()), (s, changed)
        else:
            assert changed == set(range(32)), (s, changed)
    assert loop.run(cfg, parts, stop_after=3) is None
    loop.run(cfg, parts)
    assert losses_and_lrs(parts)[0] == steps
    np.testing.assert_allclose(losses_and_lrs(parts)[1], losses, rtol=1e-6)
