"""Pallas (Triton) kernel for the fused half of a CoLA projection: y = silu(z) @ B.

The projection y = silu(x @ A) @ B is split where the remat policies need it: z = x @ A stays an
XLA matmul (tagged "cola_z" by the caller, so CoLA-M can save it), and this kernel computes
silu(z) @ B tile by tile, so h = silu(z) is never written to HBM. The backward (`silu_matmul_bwd`,
plain jnp) recomputes silu and silu' from z; the custom_vjp's residuals are its inputs (z, B), so
a remat policy that saves "cola_z" never re-runs the kernel.

Shapes: N tokens, R rank, O output features; z [N, R], B [R, O] -> y [N, O], all one dtype.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from colax.kernels.reference import silu_matmul_bwd

# Set True to run every kernel call in Pallas interpret mode (CPU tests of the whole model).
INTERPRET = False


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of 2, >= 16 for Triton's dot) and Triton launch parameters.

    A program computes a [block_n, block_out] tile of y, looping over R in block_r chunks.
    """
    block_n: int = 64
    block_out: int = 128
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def forward(self, z, b, interpret=False):
        """silu(z) @ B by this kernel (`silu_matmul_fwd_kernel`); `silu_matmul` calls it."""
        return silu_matmul_fwd_kernel(z, b, self, interpret)

    def fit(self, n, r, d_out):
        """These blocks shrunk to the problem (no tile much larger than its dimension)."""
        clamp = lambda block, dim: max(16, min(block, pl.next_power_of_2(dim)))
        return dataclasses.replace(self, block_n=clamp(self.block_n, n), block_r=clamp(self.block_r, r),
                                   block_out=clamp(self.block_out, d_out))


def _in_bounds(start, size, limit):
    """bool [size]: which of the indices start .. start + size - 1 are < limit (None: all are)."""
    return None if limit % size == 0 else start + jnp.arange(size) < limit


def _and(rows, cols):
    """The [len(rows), len(cols)] mask of two 1-D masks, either of which may be None (all true)."""
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _load(ref, mask):
    """A block load; out-of-bounds elements (mask False) read as 0, and silu(0) @ B adds nothing."""
    return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _kernel(z_ref, b_ref, y_ref, *, n, r, d_out, block_r):
    """One [block_n, block_out] tile of y = silu(z) @ B; silu in float32, dot accumulates in float32."""
    block_n, block_out = y_ref.shape
    rows = _in_bounds(pl.program_id(0) * block_n, block_n, n)
    cols = _in_bounds(pl.program_id(1) * block_out, block_out, d_out)

    def body(k, acc):
        ks = pl.ds(k * block_r, block_r)
        inner = _in_bounds(k * block_r, block_r, r)
        z = _load(z_ref.at[:, ks], _and(rows, inner)).astype(jnp.float32)
        b = _load(b_ref.at[ks, :], _and(inner, cols))
        h = (z * jax.nn.sigmoid(z)).astype(b.dtype)
        return acc + jnp.dot(h, b, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(r, block_r), body, jnp.zeros((block_n, block_out), jnp.float32))
    plgpu.store(y_ref, acc.astype(y_ref.dtype), mask=_and(rows, cols))


def silu_matmul_fwd_kernel(z, b, blocks=Blocks(), interpret=False):
    """silu(z) @ B by the Pallas kernel (forward only). z: [N, R], B: [R, O] -> [N, O], z's dtype.

    Ragged N, R and O are masked in the kernel (no padding copies). Grid: (N / block_n, O / block_out).
    """
    (n, r), d_out = z.shape, b.shape[1]
    bl = blocks.fit(n, r, d_out)
    r_pad = pl.cdiv(r, bl.block_r) * bl.block_r
    return pl.pallas_call(
        functools.partial(_kernel, n=n, r=r, d_out=d_out, block_r=bl.block_r),
        out_shape=jax.ShapeDtypeStruct((n, d_out), z.dtype),
        grid=(pl.cdiv(n, bl.block_n), pl.cdiv(d_out, bl.block_out)),
        in_specs=[pl.BlockSpec((bl.block_n, r_pad), lambda i, j: (i, 0)),
                  pl.BlockSpec((r_pad, bl.block_out), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bl.block_n, bl.block_out), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=bl.num_warps, num_stages=bl.num_stages),
        interpret=interpret,
        name="cola_silu_matmul",
    )(z, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def silu_matmul(z, b, blocks=Blocks(), interpret=False):
    """Differentiable silu(z) @ B: Pallas forward, XLA backward. z: [N, R], B: [R, O] -> [N, O].

    The forward is `blocks.forward`: this module's Triton kernel for `Blocks`, the Mosaic kernel
    for `cola_pallas_tpu.TpuBlocks`."""
    return blocks.forward(z, b, interpret)


def _fwd(z, b, blocks, interpret):
    return blocks.forward(z, b, interpret), (z, b)


def _bwd(blocks, interpret, res, dy):
    del blocks, interpret
    return silu_matmul_bwd(*res, dy)


silu_matmul.defvjp(_fwd, _bwd)


def silu_matmul_sharded(z, b, mesh, batch_axes, blocks=Blocks(), interpret=False):
    """`silu_matmul` under `jax.shard_map`: z [T, ..., R] split on axis 0 over `batch_axes`, B replicated.

    Each device runs the kernel on its own tokens; no communication in the forward, and the
    backward's dB is summed over `batch_axes` by shard_map's transpose. Returns [T, ..., O].
    """
    def local(z, b):
        y = silu_matmul(z.reshape(-1, z.shape[-1]), b, blocks, interpret)
        return y.reshape(*z.shape[:-1], b.shape[1])

    spec = P(batch_axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)(z, b)
