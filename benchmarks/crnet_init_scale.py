"""How large CR-Net's projection outputs are at init, block by block: the chain y_1 = x_1 W,
y_l = s(beta) y_(l-1) + x_l A_l B_l of one projection kind through the depth of a preset.

  python benchmarks/crnet_init_scale.py [--sizes 60m,130m,350m,1b] [--tokens 256] [--seed 0]

Each block is built by the model's own init (`Dense` for block 1: W ~ N(0, init_std); `CRNet` for
blocks 2..L: A, B ~ N(0, (r (in + out))^-1/4), beta = 1) at the preset's sizes and rank, and gets
its own unit-variance input x_l [tokens, in] (the normed residual stream; independent across
blocks, which the real inputs are not quite). Prints the std of y_l at a few depths for q
(square d x d), gate (d -> f) and down (f -> d), next to the independent-terms prediction
sqrt(in init_std^2 + (l - 1) in / (in + out)): block 1 contributes in init_std^2, each later one
E|x A B|^2 = in r std^4 = in / (in + out). CPU, float32, a few seconds a size.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from colax import config
from colax.projections import crnet
from colax.projections.common import projection_shapes

KINDS = ("q", "gate", "down")


def chain_stds(spec, name, tokens, seed):
    """[L] std of the projection `name`'s output y_l of blocks 1..L at init (float64 numpy)."""
    n_in, n_out = projection_shapes(spec.hidden_size, spec.intermediate_size)[name]
    rank = dict(spec.ranks)[name]
    keys = iter(jax.random.split(jax.random.key(seed), 2 * spec.num_layers))
    x = lambda: jax.random.normal(next(keys), (tokens, n_in), jnp.float32)
    y = crnet.CRNet.first_layer(n_in, n_out, rank, spec, rngs=nnx.Rngs(seed))(x())
    stds = [float(jnp.std(y))]
    for layer in range(1, spec.num_layers):
        y = crnet.CRNet(n_in, n_out, rank, spec, rngs=nnx.Rngs(seed + layer))(x(), y)
        stds.append(float(jnp.std(y)))
    return np.array(stds)


def predicted(spec, name, depth):
    """sqrt(in init_std^2 + (depth - 1) in / (in + out)): the std of y_depth with independent terms."""
    n_in, n_out = projection_shapes(spec.hidden_size, spec.intermediate_size)[name]
    return float(np.sqrt(n_in * spec.init_std ** 2 + (depth - 1) * n_in / (n_in + n_out)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/crnet_init_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="60m,130m,350m,1b", help="comma-separated preset sizes")
    p.add_argument("--tokens", type=int, default=256, help="rows of each block's input")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for size in args.sizes.split(","):
        cfg = config.preset("crnet", size)
        cfg.model.dtype = "float32"
        spec = config.validate(cfg)
        depths = sorted({1, 2, 4, 8, 12, 16, spec.num_layers} & set(range(1, spec.num_layers + 1)))
        print(f"\n{size}: d {spec.hidden_size}, f {spec.intermediate_size}, {spec.num_layers} blocks, "
              f"rank {dict(spec.ranks)['q']}, init_std {spec.init_std}; output std at block "
              + ", ".join(map(str, depths)) + " (prediction in brackets)")
        for name in KINDS:
            stds = chain_stds(spec, name, args.tokens, args.seed)
            cells = [f"{stds[l - 1]:.2f} ({predicted(spec, name, l):.2f})" for l in depths]
            print(f"  {name:5s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
