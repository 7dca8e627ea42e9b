"""The full-rank projection (the LLaMA baseline, `model.projection="dense"`)."""

from flax import nnx

from colax.matmul import matmul
from colax.projections.common import normal


class Dense(nnx.Module):
    """Full-rank projection `y = x @ W`, W [in, out] ~ N(0, cfg.init_std), no bias."""

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        del rank
        self.w = nnx.Param(normal(cfg.init_std)(rngs.params(), (in_features, out_features), cfg.param_dtype))

    def __call__(self, x):
        """x: [..., in] compute dtype -> [..., out] same dtype."""
        return matmul(x, self.w[...].astype(x.dtype))

    @staticmethod
    def flops_per_token(in_features, out_features, rank):
        return 2 * in_features * out_features

    @staticmethod
    def param_axes(in_axis, out_axis):
        """Logical axes of each parameter, for colax.sharding."""
        return {"w": (in_axis, out_axis)}
