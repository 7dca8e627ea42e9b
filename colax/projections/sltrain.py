"""SLTrain (Han et al., 2024), `model.projection="sltrain"`: sparse plus low-rank projections."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from colax.projections.common import ALPHA_CONFIG, check_alpha

# The stored support of a sparse matrix is padded to a multiple of this many entries, so that an
# FSDP axis of up to 256 devices (any power of two) splits it evenly.
SPARSE_ALIGN = 256
# The authors' recipe, andyjm3/SLTrain@2335d62 scripts/llm_pretrain/sltrain{60m,130m,350m,1b}.sh:
# alpha per size (tiny: as 60M), peak lr, AdamW without weight decay (the scripts pass no
# --grad_clipping, default 0.0: no clipping), optimizer steps and warmup per size (tiny keeps its own).
ALPHA = {"tiny": 32.0, "60m": 32.0, "130m": 16.0, "350m": 16.0, "1b": 8.0}
LR = 0.003
STEPS = {"60m": (11_000, 1_100), "130m": (22_000, 2_200), "350m": (65_000, 6_500), "1b": (140_000, 10_000)}


def sparse_sizes(in_features, out_features, density):
    """(nnz, stored): entries of the support, int(density * in * out) (rounded down, as the authors'
    SpLoRaLinear._init_sparse_parameters), and that padded to SPARSE_ALIGN."""
    nnz = int(density * in_features * out_features)
    return nnz, -(-nnz // SPARSE_ALIGN) * SPARSE_ALIGN


@functools.partial(jax.checkpoint, static_argnums=(5,))
def sltrain_matmul(x, a, b, values, index, scale):
    """x @ (scale * a @ b + S): x [..., in] compute dtype, a [in, r], b [r, out], S [in, out] the
    scatter of `values` [stored] at the row-major flat indices `index` int32 [stored] (out-of-range
    ones dropped) -> [..., out] in x's dtype.

    Checkpointed: the backward pass rebuilds the dense [in, out] matrix (2 in out r FLOPs and a
    scatter) instead of keeping it per layer, which would cost a full-rank weight's memory.
    """
    n_in, n_out = a.shape[0], b.shape[1]
    flat = jnp.zeros(n_in * n_out, values.dtype).at[index].set(values, mode="drop", indices_are_sorted=True,
                                                               unique_indices=True)
    w = scale * (a @ b) + flat.reshape(n_in, n_out)
    return x @ w.astype(x.dtype)


class SLTrain(nnx.Module):
    """Sparse plus low-rank projection `y = x @ W`, `W = (alpha / r) * A @ B + S` (SLTrain, Han et al. 2024).

    A [in, r] is Kaiming-uniform with a = sqrt(5) (U(-1/sqrt(in), 1/sqrt(in))), B [r, out] is zero,
    alpha is `cfg.lora_alpha`. S [in, out] has nnz = int(cfg.sparse_density * in * out) non-zeros
    on a support drawn uniformly without replacement at init and never changed: `index`, int32
    [stored], the sorted row-major flat indices (row * out + col) of the support, then in * out + k
    for the k-th padding slot (`sparse_sizes`; the scatter drops those, so they are inert); `values`,
    float [stored], U(-1/sqrt(in), 1/sqrt(in)) on the support and 0 on the padding. `index` is a
    parameter only so that it is checkpointed and sharded with the rest: being integer, it is never
    differentiated nor trained (`model.trainable_mask`).

    The forward scatters `values` into a dense [in, out] matrix, adds the low-rank product and
    does one dense matmul (`sltrain_matmul`; benchmarks/sparse_matmul.py: faster than gathering
    x's columns and segment-summing them; docs/methods.md).
    """

    config = dict(
        ALPHA_CONFIG,
        sparse_density=0.03,  # SLTrain: fraction of each projection's entries in its sparse part
    )
    preset_sizes = tuple(ALPHA)  # the sizes the paper gives an alpha for

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        bound = in_features ** -0.5
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, cfg.param_dtype, -bound, bound)
        nnz, stored = sparse_sizes(in_features, out_features, cfg.sparse_density)
        size = in_features * out_features
        support = jnp.sort(jax.random.choice(rngs.params(), size, (nnz,), replace=False)).astype(jnp.int32)
        self.A = nnx.Param(uniform((in_features, rank)))
        self.B = nnx.Param(jnp.zeros((rank, out_features), cfg.param_dtype))
        self.index = nnx.Param(jnp.concatenate([support, size + jnp.arange(stored - nnz, dtype=jnp.int32)]))
        self.values = nnx.Param(jnp.concatenate([uniform((nnz,)), jnp.zeros((stored - nnz,), cfg.param_dtype)]))
        self.scale = cfg.lora_alpha / rank

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return sltrain_matmul(x, self.A[...], self.B[...], self.values[...], self.index[...], self.scale)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        """One dense matmul per token (forming W, 2 in out r FLOPs in the forward and again in the
        backward, is per micro-batch, not per token)."""
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding: the support and its values split by FSDP."""
        return {"A": (in_axis, "rank"), "B": ("rank", out_axis), "index": ("sparse",), "values": ("sparse",)}

    @staticmethod
    def padding(in_features, out_features, rank, cfg):
        """Stored `values` entries that are padding, not parameters (for `model.count_params`)."""
        nnz, stored = sparse_sizes(in_features, out_features, cfg.sparse_density)
        return stored - nnz

    @staticmethod
    def check_config(m, require, selected):
        """model.lora_alpha > 0 and model.sparse_density in (0, 1]."""
        del selected
        check_alpha(m, require)
        require(0 < m.sparse_density <= 1, "sparse_density", "must be in (0, 1]", m.sparse_density)

    @staticmethod
    def preset(cfg, size, paper):
        """The size's model and rank (the authors' scripts use the same) with the authors' alpha, lr,
        no weight decay, no clipping, and their steps and warmup (`STEPS`)."""
        del paper
        cfg.model.lora_alpha = ALPHA[size]
        cfg.optim.update(lr=LR, weight_decay=0.0, grad_clip=0.0)
        if size in STEPS:
            cfg.train.steps, cfg.optim.warmup_steps = STEPS[size]
