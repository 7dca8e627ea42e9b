"""Pallas TPU (Mosaic) kernel for the fused half of a CoLA projection: y = silu(z) @ B.

The TPU counterpart of `cola_pallas` (Triton, GPU), with the same job and the same split: z = x @ A
stays an XLA matmul (tagged "cola_z" by the caller) and this kernel computes silu(z) @ B a
[block_n, block_out] tile at a time, so h = silu(z) never goes to HBM. Each tile reads its
[block_n, R] rows of z and [R, block_out] columns of B whole (R is the rank, 64-512 in the paper's
presets: the two blocks fit VMEM), computes silu in float32 and one MXU dot accumulating in float32.
The custom_vjp and the shard_map wrapper are `cola_pallas`'s (`silu_matmul`, `silu_matmul_sharded`),
which run this kernel when given `TpuBlocks`; the backward is the same plain-jnp `silu_matmul_bwd`.

Shapes: N tokens, R rank, O output features; z [N, R], B [R, O] -> y [N, O], all one dtype. Ragged
N and O need no padding: Mosaic reads past the edge of the last tile (rows and columns of y that are
never written back) and masks its writes; R is always whole.

A Mosaic kernel cannot be partitioned by GSPMD: on a mesh it must run under `jax.shard_map`
(`silu_matmul_sharded`; `kernels.silu_matmul_any` does that under a context mesh).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    """Tile sizes of the TPU kernel: a program computes a [block_n, block_out] tile of y.

    Mosaic's tiles are (8, 128): block_n must be a multiple of 8 and block_out of 128, unless the
    tile spans the whole dimension (`fit` shrinks a block to a dimension smaller than it).
    """
    block_n: int = 256
    block_out: int = 512

    def __post_init__(self):
        if self.block_n % 8 or self.block_out % 128:
            raise ValueError(f"TpuBlocks: block_n={self.block_n} must be a multiple of 8 and "
                             f"block_out={self.block_out} of 128 (Mosaic's (8, 128) tiles)")

    def fit(self, n, d_out):
        """(block_n, block_out) for y [n, d_out]: a block larger than its dimension becomes the dimension."""
        return min(self.block_n, n), min(self.block_out, d_out)

    def forward(self, z, b, interpret=False):
        """silu(z) @ B by this kernel (`silu_matmul_fwd_tpu`); `cola_pallas.silu_matmul` calls it."""
        return silu_matmul_fwd_tpu(z, b, self, interpret)


def _kernel(z_ref, b_ref, y_ref):
    """One [block_n, block_out] tile: silu of z's rows in float32, cast to B's dtype, one dot into float32."""
    z = z_ref[...].astype(jnp.float32)
    h = (z * jax.nn.sigmoid(z)).astype(b_ref.dtype)
    y_ref[...] = jnp.dot(h, b_ref[...], preferred_element_type=jnp.float32).astype(y_ref.dtype)


def silu_matmul_fwd_tpu(z, b, blocks=TpuBlocks(), interpret=False):
    """silu(z) @ B by the Mosaic kernel (forward only). z: [N, R], B: [R, O] -> [N, O], z's dtype.

    Grid (N / block_n, O / block_out), both axes parallel (split across a chip's TensorCores).
    """
    (n, r), d_out = z.shape, b.shape[1]
    block_n, block_out = blocks.fit(n, d_out)
    return pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((n, d_out), z.dtype),
        grid=(pl.cdiv(n, block_n), pl.cdiv(d_out, block_out)),
        in_specs=[pl.BlockSpec((block_n, r), lambda i, j: (i, 0)),
                  pl.BlockSpec((r, block_out), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_n, block_out), lambda i, j: (i, j)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="cola_silu_matmul_tpu",
    )(z, b)
