"""GaLore and Fira (colax.galore, optim.name = galore | fira) against their formulas written out here.

Against the authors' optimizers themselves: tests/test_galore_official.py. Reference here: numpy
on small matrix stacks, in colax's [in, out] layout. SVD signs are arbitrary, so projectors are compared as
projection operators (PᵀP or PPᵀ) and the references reuse the state's projector; updates are
sign-invariant and compared directly.
"""

import jax
import numpy as np
import optax
import pytest

from colax import config, galore, optim, plan, sharding, state
from colax.errors import ConfigError

B1, B2, EPS, SCALE = 0.9, 0.999, 1e-6, 0.25


def rng_grads(seed, shapes):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def top_vectors_operator(g, rank, right):
    """The projection onto the top-`rank` right (or left) singular space of g [m, n], numpy."""
    u, _, vh = np.linalg.svd(g.astype(np.float64))
    basis = vh[:rank].T if right else u[:, :rank]
    return basis @ basis.T


def projector_of(st, key):
    (p,) = st.projector[key].values()
    return np.asarray(p)


def moment_of(tree, key):
    (x,) = tree[key].values()
    return np.asarray(x)


def adam_direction(mu, nu, t):
    """The reference code's Adam: c_t m / (sqrt(v) + eps), c_t = sqrt(1 - b2^t) / (1 - b1^t)."""
    return np.sqrt(1 - B2 ** t) / (1 - B1 ** t), mu / (np.sqrt(nu) + EPS)


def test_projection_side_and_r_dim_moments():
    # two independent matrices per leaf, [in, out]: the reference (torch's [out, in]) projects
    # a tall one from the right, a wide or square one from the left (compressing the input side)
    shapes = {"tall": (2, 6, 4), "wide": (2, 4, 6), "square": (2, 4, 4)}
    grads = rng_grads(0, shapes)
    tx = galore.scale_by_galore(rank=2, update_proj_gap=5, scale=SCALE, eps=EPS)
    updates, st = jax.jit(tx.update)(grads, tx.init(grads))
    assert [list(st.projector[k]) for k in shapes] == [["rank_rows"], ["rank_cols"], ["rank_cols"]]
    assert projector_of(st, "tall").shape == (2, 2, 4) and projector_of(st, "wide").shape == (2, 4, 2)
    assert moment_of(st.mu, "tall").shape == (2, 6, 2) and moment_of(st.nu, "wide").shape == (2, 2, 6)
    assert projector_of(st, "square").shape == (2, 4, 2) and moment_of(st.mu, "square").shape == (2, 2, 4)
    for key, right in (("tall", True), ("wide", False), ("square", False)):
        p = projector_of(st, key)
        for i in range(2):
            g = grads[key][i]
            operator = p[i].T @ p[i] if right else p[i] @ p[i].T
            np.testing.assert_allclose(operator, top_vectors_operator(g, 2, right), atol=1e-5)
            u, _, vh = np.linalg.svd(g.astype(np.float64))
            r = g @ vh[:2].T if right else u[:, :2].T @ g        # R = G Pᵀ (rows > cols) or Pᵀ G
            c, n0 = adam_direction((1 - B1) * r, (1 - B2) * r * r, 1)
            back = n0 @ vh[:2] if right else u[:, :2] @ n0
            np.testing.assert_allclose(updates[key][i], c * SCALE * back, rtol=1e-4, atol=1e-6)


def test_refresh_exactly_every_T_steps_and_moments_kept():
    T, rank = 3, 2
    tx = galore.scale_by_galore(rank=rank, update_proj_gap=T, scale=SCALE, eps=EPS)
    update = jax.jit(tx.update)
    st = tx.init({"w": np.zeros((1, 6, 4), np.float32)})
    mu = nu = np.zeros((6, rank))
    previous = None
    for t in range(1, 8):  # counts 0..6: refreshes at counts 0, 3, 6 (steps 1, 4, 7)
        g = rng_grads(t, {"w": (1, 6, 4)})
        updates, st = update(g, st)
        p = projector_of(st, "w")[0]
        if (t - 1) % T == 0:
            np.testing.assert_allclose(p.T @ p, top_vectors_operator(g["w"][0], rank, True), atol=1e-5)
            assert previous is None or not np.allclose(p, previous, atol=1e-3)
        else:
            np.testing.assert_array_equal(p, previous)
        previous = p
        r = g["w"][0] @ p.T
        mu, nu = B1 * mu + (1 - B1) * r, B2 * nu + (1 - B2) * r * r  # never reset at a refresh
        np.testing.assert_allclose(moment_of(st.mu, "w")[0], mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(moment_of(st.nu, "w")[0], nu, rtol=1e-5, atol=1e-9)
        c, n0 = adam_direction(mu, nu, t)
        np.testing.assert_allclose(updates["w"][0], c * SCALE * n0 @ p, rtol=1e-4, atol=1e-6)


def fira_reference(g, p, mu, nu, t, previous_norm, right):
    """One Fira step for one matrix, numpy: (update, ||S|| stored, limiter)."""
    r = g @ p.T if right else p.T @ g
    mu, nu = B1 * mu + (1 - B1) * r, B2 * nu + (1 - B2) * r * r
    c, n0 = adam_direction(mu, nu, t)
    back = (lambda x: x @ p) if right else (lambda x: p @ x)
    axis = 1 if right else 0  # phi: one per row of a [m, r] R, per column of a [r, n] R
    phi = np.linalg.norm(n0, axis=axis, keepdims=True) / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8)
    s = phi * (g - SCALE * back(r))  # the reference subtracts the scale-weighted back-projection
    norm = np.linalg.norm(s)
    limiter = 1.0 if previous_norm is None else max(norm / (previous_norm + 1e-8), 1.01) / 1.01
    return c * (SCALE * back(n0) + s / limiter), norm / limiter, limiter, mu, nu


@pytest.mark.parametrize("shape", [(1, 6, 4), (1, 4, 6)])
def test_fira_phi_residual_and_norm_growth_limiter(shape):
    right = shape[1] > shape[2]
    tx = galore.scale_by_galore(rank=2, update_proj_gap=100, scale=SCALE, eps=EPS, fira=True)
    update = jax.jit(tx.update)
    st = tx.init({"w": np.zeros(shape, np.float32)})
    base = rng_grads(0, {"w": shape})["w"]
    mu = nu = norm = None
    limiters, p = [], None
    in_subspace = lambda: (base[0] @ p.T @ p if right else p @ p.T @ base[0])[None]  # the residual shrinks
    for t in range(1, 4):
        g = [base, base + 3 * rng_grads(1, {"w": shape})["w"], None][t - 1]
        g = in_subspace() if g is None else g
        updates, st = update({"w": g}, st)
        p = projector_of(st, "w")[0]
        if mu is None:
            mu = nu = np.zeros_like(g[0] @ p.T if right else p.T @ g[0])
        expected, new_norm, limiter, mu, nu = fira_reference(g[0].astype(np.float64), p, mu, nu, t, norm, right)
        np.testing.assert_allclose(updates["w"][0], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(st.norm["w"]["per_matrix"][0], new_norm, rtol=1e-5)
        if limiter > 1:  # rescaled so that the norm grew by exactly gamma
            assert float(st.norm["w"]["per_matrix"][0]) == pytest.approx(1.01 * norm, rel=1e-5)
        limiters.append(limiter)
        norm = new_norm
    assert limiters[0] == 1 and limiters[1] > 1.05 and limiters[2] == 1  # each branch of the limiter ran


def optim_config(**kw):
    o = optim.defaults()
    o.update(name="galore", rank=4, update_proj_gap=2, scale=SCALE, eps=EPS, warmup_steps=0, grad_clip=0.0,
             weight_decay=0.1)
    o.update(**kw)
    return o


def test_only_projection_weights_wider_than_the_rank_are_projected_the_rest_get_the_reference_adam():
    shapes = {"embed": (10, 8), "final_norm": {"weight": (8,)},
              "blocks": {"q": {"w": (2, 8, 8)}, "gate": {"A": (2, 8, 4), "B": (2, 4, 12)},
                         "attn_norm": {"weight": (2, 8)}}}
    params = jax.tree.map(lambda s: np.random.default_rng(len(s)).standard_normal(s).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    assert optim.projected(params, 4) == {"embed": False, "final_norm": {"weight": False}, "blocks": {
        "q": {"w": True}, "gate": {"A": False, "B": False}, "attn_norm": {"weight": False}}}  # sides of 4: not > 4
    assert optim.projected(params, 3)["blocks"]["gate"] == {"A": True, "B": True}  # CoLA factors, rank below theirs
    o = optim_config()
    lr = optim.schedule(o, 100)
    tx = optim.make(o, 100)
    st, p, update = tx.init(params), params, jax.jit(tx.update)
    mu = nu = jax.tree.map(np.zeros_like, params)
    low_rank = galore.scale_by_galore(4, 2, SCALE, B1, B2, EPS)
    low_rank_state, low_rank_update = low_rank.init(params["blocks"]["q"]), jax.jit(low_rank.update)
    for t in range(1, 4):
        grads = jax.tree.map(lambda x: np.random.default_rng(t).standard_normal(x.shape).astype(np.float32), params)
        updates, st = update(grads, st, p)
        mu = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g * g, nu, grads)
        # the reference's Adam (eps added to sqrt(v) before the bias correction), -lr, then its decoupled
        # decay of the stepped p: (p - lr d)(1 - lr wd) - p, written without fp32's cancellation
        decayed = lambda d, x: -float(lr(t - 1)) * (d + 0.1 * (x - float(lr(t - 1)) * d))
        direction = lambda m, v: np.multiply(*adam_direction(m, v, t))
        adamw = jax.tree.map(lambda m, v, x: decayed(direction(m, v), x), mu, nu, p)
        direction, low_rank_state = low_rank_update(grads["blocks"]["q"], low_rank_state)
        adamw["blocks"]["q"]["w"] = decayed(direction["w"], p["blocks"]["q"]["w"])
        for path, u in jax.tree_util.tree_leaves_with_path(updates):
            expected = adamw
            for k in path:
                expected = expected[k.key]
            np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        p = optax.apply_updates(p, updates)


@pytest.mark.parametrize("field, value, message", [
    ("rank", 128, "optim.rank=128 must be smaller than the smaller side of a projection weight (largest: blocks/"),
    ("update_proj_gap", 0, "optim.update_proj_gap must be a positive integer, got 0"),
    ("name", "sgd", "optim.name must be one of adamw, galore, fira, got 'sgd'")])
def test_bad_settings_are_one_line_errors_naming_the_field(field, value, message):
    cfg = config.preset("galore", "tiny")  # d = 128: a rank must be below it
    cfg.optim[field] = value
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_state_leaves_get_logical_axes_derived_from_their_parameter():
    cfg = config.preset("fira", "tiny")
    spec = config.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    _, opt_state = state.abstract_state(spec, optim.make(cfg.optim, cfg.train.steps), mesh)
    axes = {jax.tree_util.keystr(path): (leaf.shape, state.param_logical_axes(path))
            for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)}
    find = lambda *parts: next(v for k, v in axes.items() if all(f"{p}" in k for p in parts))
    d, f, r, layers = 128, 344, 32, 2
    # q [L, d, d] and gate [L, d, f]: rows <= cols, P = U_r [d, r], R [r, n]; down [L, f, d]: P = V_r^T [r, d].
    assert find("projector", "'q'") == ((layers, d, r), ("layers", "embed", "opt_rank"))
    assert find("mu", "'q'") == ((layers, r, d), ("layers", "opt_rank", "heads"))
    assert find("projector", "'down'") == ((layers, r, d), ("layers", "opt_rank", "embed"))
    assert find("projector", "'gate'") == ((layers, d, r), ("layers", "embed", "opt_rank"))
    assert find("nu", "'gate'") == ((layers, r, f), ("layers", "opt_rank", "mlp"))
    assert find("norm", "'down'") == ((layers,), ("layers",))
    assert find("mu", "'embed'") == ((cfg.model.vocab_size, d), ("vocab", "embed"))
    assert sharding.logical_spec(("layers", "opt_rank", "heads")) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_plan_reports_the_optimizer_state_the_rank_implies():
    cfg = config.preset("galore", "tiny")  # full rank, d = 128, f = 344, 2 layers, r = 32, fp32
    spec = config.validate(cfg)
    d, f, layers, r, vocab = 128, 344, 2, 32, cfg.model.vocab_size
    total = 2 * vocab * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    projected = layers * (4 * d * d + 3 * d * f)
    # per layer: down projects from the right (P [r, n], moments [m, r]), q, k, v, o, gate and up
    # from the left (P [m, r], moments [r, n]): r * (n + 2m) or r * (m + 2n)
    low_rank = layers * (4 * r * (d + 2 * d) + r * (d + 2 * f) + 2 * r * (d + 2 * f))
    counts = 3 * 4  # int32 step counts: Adam, GaLore, the lr schedule
    # AdamW (optax.scale_by_adam: full rank asks for no per-vector counts): its step count, the lr schedule's
    rows = {row["name"]: row for row in plan.optimizer_state(spec, cfg)}
    assert rows["adamw"]["bytes"] == 8 * total + 4 * 2
    assert rows["galore"]["bytes"] == 8 * (total - projected) + 4 * low_rank + counts
    assert rows["fira"]["bytes"] == rows["galore"]["bytes"] + 7 * layers * 4  # one norm per matrix
    assert rows["galore"]["current"] and rows["galore"]["vs_adamw"] == rows["galore"]["bytes"] / rows["adamw"]["bytes"]
