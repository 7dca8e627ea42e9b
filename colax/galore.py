"""GaLore and Fira: Adam on gradients projected to a rank-r subspace, as one optax transformation.

`scale_by_galore(rank, update_proj_gap, scale, b1, b2, eps, fira)` turns the gradient of every
matrix stack it is given, G [..., m, n] (the leading axes, e.g. the stacked layers [L], are
independent matrices), into the update direction; `colax.optim.make` masks it onto the projection
weights and chains it with weight decay and the learning rate (everything else gets
`scale_by_reference_adam`).

GaLore (Zhao et al. 2024): every `update_proj_gap` steps (at steps 0, T, 2T, ...) the projector P
is the top-r singular vectors of the current G, from an fp32 SVD inside the jitted step (under
`lax.cond`: one compiled step, the SVD only runs on refresh steps). The side is the reference
code's, decided on torch's [out, in] = Gᵀ (galore_projector.py: Gᵀ rows >= cols -> its right
vectors): colax's G [m, n] = [in, out] with m > n gets its right vectors P [r, n] and R = G Pᵀ
[m, r]; m <= n (square q, k, v, o included) its left ones P [m, r] and R = Pᵀ G [r, n], the input
side compressed. Adam's moments live in R's r-dim space and are kept across refreshes, so the
signs of the singular vectors (the SVD's, as arbitrary as in the reference) change the steps after
a refresh. Direction: scale · P-back(N), with N = c_t m / (sqrt(v) + eps), c_t = sqrt(1 - b2^t) /
(1 - b1^t): Adam as the reference code writes it (eps added to sqrt(v) before the bias correction,
which multiplies the whole direction); `scale_by_reference_adam` is that Adam for the parameters
that are not projected.

Fira (Chen et al. 2025) adds the gradient outside the subspace: with N0 = m / (sqrt(v) + eps),
phi = ||N0|| / (||R|| + 1e-8) per index of the un-projected axis (columns of a [r, n] R, rows of a
[m, r] one), S = phi ⊙ (G - scale · P-back(R)), and a norm-growth limiter: if ||S_t|| / ||S_t-1||
exceeds gamma = 1.01, S_t is rescaled so that the ratio is gamma and the limited norm is stored.
Direction: c_t (scale · P-back(N0) + S).

State layout (for `colax.state.STATE_LAYOUTS`): each leaf's projector, moments and Fira norm sit
at the parameter's dict-key path under one more dict key naming which axis is the rank r
("rank_rows", "rank_cols") or that the matrix axes are gone ("per_matrix"), so sharding derives
their logical axes from the parameter's.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from colax import sharding

GAMMA = 1.01  # Fira's norm-growth limit


class ScaleByGaloreState(NamedTuple):
    count: jax.Array  # int32 [], steps taken
    projector: Any    # per leaf {"rank_rows": [..., r, n]} (m > n) or {"rank_cols": [..., m, r]}
    mu: Any           # per leaf {"rank_cols": [..., m, r]} (m > n) or {"rank_rows": [..., r, n]}
    nu: Any           # as mu
    norm: Any         # Fira: per leaf {"per_matrix": fp32 [...]}, ||S|| after the limiter; GaLore: None


def projects_right(shape):
    """Whether a [..., m, n] = [..., in, out] matrix is projected from the right (m > n: P [r, n],
    R [m, r]): the reference's rule on torch's [out, in] layout, which projects its transpose
    [n, m] from the left exactly when n < m (galore_projector.py, `shape[0] >= shape[1]`)."""
    return shape[-2] > shape[-1]


def rank_axes(shape):
    """(projector's, moments') rank axis for a [..., m, n] stack: (-2, -1) if m > n (P [r, n],
    R [m, r]), else (-1, -2) (P [m, r], R [r, n])."""
    return (-2, -1) if projects_right(shape) else (-1, -2)


def _wrap(x, rank_axis):
    """x inside the dict whose key names its layout: rank_axis -2 -> "rank_rows", -1 -> "rank_cols"."""
    return {"rank_rows" if rank_axis == -2 else "rank_cols": x}


def _unwrap(d):
    (x,) = d.values()
    return x


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def svd_projector(g, rank):
    """Top-`rank` singular vectors of g [..., m, n], from an fp32 SVD: Vᵀ rows [..., r, n] if
    m > n, else U columns [..., m, r]; in g's dtype. Their signs are the SVD's (LAPACK's on CPU),
    as arbitrary as the reference's."""
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    p = vh[..., :rank, :] if projects_right(g.shape) else u[..., :rank]
    return p.astype(g.dtype)


def project(g, p):
    """R = G Pᵀ [..., m, r] (m > n) or Pᵀ G [..., r, n]."""
    return g @ _t(p) if projects_right(g.shape) else _t(p) @ g


def project_back(x, p, shape):
    """x (R-shaped) back to the [..., m, n] of `shape`: x P or P x."""
    return x @ p if projects_right(shape) else p @ x


def _factor(g, rank):
    """`svd_projector` of g [..., m, n] laid out for the SVD: the leading (layer) axes flattened
    to one batch axis and split over fsdp, then over fsdp x tensor, where they divide it
    (`sharding.constrain_divisible`), matrices whole, so each device factors its own layers; the
    projectors come back split over fsdp. Two stages, because GSPMD moves a stack from its
    parameter layout to layers-over-fsdp, and from there to layers-over-fsdp-x-tensor, by
    all-to-alls, but from the one straight to the other only by replicating it
    (benchmarks/galore_svd.py)."""
    b = g.reshape(-1, *g.shape[-2:])
    for axes in ("svd_batch_fsdp", "svd_batch"):
        b = sharding.constrain_divisible(b, (axes, None, None))
    p = sharding.constrain_divisible(svd_projector(b, rank), ("svd_batch_fsdp", None, None))
    return p.reshape(*g.shape[:-2], *p.shape[-2:])


def _refresh(grads, projector, rank):
    """The projector tree of a refresh step: the SVD of every gradient stack, in the dtype of
    the current `projector` tree."""
    def one(g, old):
        return _wrap(_factor(g, rank).astype(_unwrap(old).dtype), rank_axes(g.shape)[0])

    return jax.tree.map(one, grads, projector)


def fira_residual(g, r, n0, p, scale):
    """S = phi ⊙ (G - scale · P-back(R)) [..., m, n]: phi = ||N0|| / (||R|| + 1e-8) along the rank
    axis, one per index of the un-projected axis.

    The reference code (Fira's fira_adamw.py) subtracts `project_back(grad)`, whose projector
    multiplies by `scale`: so the residual is G - scale · P-back(R), not G - P-back(R).
    """
    rank_axis = rank_axes(g.shape)[1]
    phi = (jnp.linalg.norm(n0, axis=rank_axis, keepdims=True)
           / (jnp.linalg.norm(r, axis=rank_axis, keepdims=True) + 1e-8))
    return phi * (g - scale * project_back(r, p, g.shape))


def limit_growth(s, previous, first, gamma=GAMMA):
    """(S rescaled, its norm) [..., m, n], [...]: S / limiter with limiter = max(||S|| / (previous
    + 1e-8), gamma) / gamma (the reference's formula), or S itself on the first step."""
    norm = jnp.sqrt(jnp.sum(jnp.square(s.astype(jnp.float32)), axis=(-2, -1)))
    limiter = jnp.where(first, 1.0, jnp.maximum(norm / (previous + 1e-8), gamma) / gamma)
    return s / limiter[..., None, None].astype(s.dtype), (norm / limiter).astype(previous.dtype)


def _moment(x, g, decay):
    """An exponential moving average's next value, decay · x + (1 - decay) · g, in x's dtype."""
    return (decay * x + (1 - decay) * g).astype(x.dtype)


def bias_correction(count, b1, b2):
    """c_t = sqrt(1 - b2^t) / (1 - b1^t) at t = count + 1 (count: int32 [], steps taken), the
    reference's step-size factor."""
    t = count + 1
    return jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)


def scale_by_reference_adam(b1=0.9, b2=0.999, eps=1e-6):
    """Adam as GaLore's and Fira's reference AdamW computes it for the parameters it does not
    project (galore_torch/adamw.py): c_t m / (sqrt(v) + eps), eps added before the bias correction
    (optax's `scale_by_adam` adds it after). State `optax.ScaleByAdamState`, moments shaped and
    typed like the parameters, as optax's."""
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: _moment(m, g, b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: _moment(v, g * g, b2), state.nu, updates)
        c = bias_correction(state.count, b1, b2)
        out = jax.tree.map(lambda g, m, v: (c * m / (jnp.sqrt(v) + eps)).astype(g.dtype), updates, mu, nu)
        return out, optax.ScaleByAdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def scale_by_galore(rank, update_proj_gap, scale, b1=0.9, b2=0.999, eps=1e-6, fira=False):
    """GaLore's (or, with `fira`, Fira's) update direction for matrix-stack leaves [..., m, n].

    rank: r <= min(m, n) of every leaf; update_proj_gap: T, steps between SVD refreshes (> 0);
    scale: the factor on the back-projected Adam step. Leaves keep their dtype; the SVD is fp32.
    """
    def init(params):
        def zeros(p, which):
            rank_axis, shape = rank_axes(p.shape)[which], list(p.shape)
            shape[rank_axis] = rank
            return _wrap(jnp.zeros(shape, p.dtype), rank_axis)

        projector, moment = (lambda p: zeros(p, 0)), (lambda p: zeros(p, 1))
        norm = jax.tree.map(lambda p: {"per_matrix": jnp.zeros(p.shape[:-2], jnp.float32)}, params) if fira else None
        return ScaleByGaloreState(count=jnp.zeros([], jnp.int32), projector=jax.tree.map(projector, params),
                                  mu=jax.tree.map(moment, params), nu=jax.tree.map(moment, params), norm=norm)

    def leaf_update(g, p, mu, nu, norm, count, c):
        """One matrix stack: (direction, mu, nu, Fira's norm or None), state leaves unwrapped."""
        r = project(g, p)
        mu, nu = _moment(mu, r, b1), _moment(nu, r * r, b2)
        n0 = mu / (jnp.sqrt(nu) + eps)
        direction = scale * project_back(n0, p, g.shape)
        if fira:
            s, norm = limit_growth(fira_residual(g, r, n0, p, scale), norm, count == 0)
            direction = direction + s
        return (c * direction).astype(g.dtype), mu, nu, norm

    def update(updates, state, params=None):
        del params
        projector = jax.lax.cond(state.count % update_proj_gap == 0, lambda: _refresh(updates, state.projector, rank),
                                 lambda: state.projector)
        c = bias_correction(state.count, b1, b2)
        treedef = jax.tree.structure(updates)
        state_leaves = [treedef.flatten_up_to(x) for x in (projector, state.mu, state.nu)]
        norms = treedef.flatten_up_to(state.norm) if fira else [None] * treedef.num_leaves
        new = [leaf_update(g, _unwrap(p), _unwrap(mu), _unwrap(nu), None if norm is None else norm["per_matrix"],
                           state.count, c)
               for g, p, mu, nu, norm in zip(jax.tree.leaves(updates), *state_leaves, norms)]
        out, mus, nus, norms = zip(*new) if new else ((),) * 4
        wrap = lambda xs: treedef.unflatten([_wrap(x, rank_axes(g.shape)[1]) for x, g in zip(xs, out)])
        return treedef.unflatten(out), ScaleByGaloreState(
            count=optax.safe_increment(state.count), projector=projector, mu=wrap(mus), nu=wrap(nus),
            norm=treedef.unflatten([{"per_matrix": n} for n in norms]) if fira else None)

    return optax.GradientTransformation(init, update)
