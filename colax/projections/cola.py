"""CoLA (arXiv 2502.10940), `model.projection="cola"`: the low-rank auto-encoder projection."""

from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from colax import kernels, sharding
from colax.matmul import matmul
from colax.projections.common import normal


class CoLA(nnx.Module):
    """CoLA auto-encoder projection `y = silu(x @ A) @ B`, A [in, r], B [r, out], no bias.

    A and B are i.i.d. N(0, std) with std = (r * (in + out)) ** -0.25. The r-wide pre-activation
    `z = x @ A` and `h = silu(z)` are tagged "cola_z" and "cola_h" for the CoLA-M remat policies
    (the Pallas kernel, `cfg.kernel="pallas"`, fuses silu(z) @ B, so it has no h to tag).
    On a mesh z is whole on every tensor device (the tensor-parallel layout in docs/sharding.md).
    """

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        std = (rank * (in_features + out_features)) ** -0.25
        self.A = nnx.Param(normal(std)(rngs.params(), (in_features, rank), cfg.param_dtype))
        self.B = nnx.Param(normal(std)(rngs.params(), (rank, out_features), cfg.param_dtype))
        self.kernel = cfg.kernel

    def bottleneck(self, x):
        """z = x @ A: x [..., in] compute dtype -> [..., r] same dtype, tagged "cola_z"."""
        z = sharding.constrain(matmul(x, self.A[...].astype(x.dtype)), ("batch", "length", "act_rank"))
        return checkpoint_name(z, "cola_z")

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return kernels.silu_matmul_any(self.bottleneck(x), self.B[...].astype(x.dtype), kernel=self.kernel)

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * rank * (in_features + out_features)

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding: the rank axis is never split by tensor."""
        return {"A": (in_axis, "rank"), "B": ("rank", out_axis)}

    @staticmethod
    def preset(cfg, size, paper):
        """The paper's recipe: its peak lr at `size` and, from 350M up, only the low-rank activation."""
        del size
        cfg.optim.lr = paper["lr"]
        cfg.model.only_lr_act = paper["only_lr_act"]
