"""CoLA projection kernels: `cola_matmul(x, A, B, kernel=...)` with kernel "xla" or "pallas".

"xla" is the plain-jnp projection (the default); "pallas" runs z = x @ A in XLA and the fused
silu(z) @ B in a Pallas kernel for the target platform (`target_platform()`): Triton on a GPU
(`cola_pallas`), Mosaic on a TPU (`cola_pallas_tpu`); on CPU only in interpret mode.
Both tag z = x @ A "cola_z"; "xla" also tags h = silu(z) "cola_h" (the Pallas path never has h).
"""

import contextlib
import contextvars

import jax
from jax.ad_checkpoint import checkpoint_name

from colax.errors import ConfigError
from colax.matmul import matmul
from colax.kernels import cola_pallas
from colax.kernels.cola_pallas import Blocks, silu_matmul, silu_matmul_fwd_kernel, silu_matmul_sharded
from colax.kernels.cola_pallas_tpu import TpuBlocks, silu_matmul_fwd_tpu
from colax.kernels.reference import cola_reference, silu_matmul_bwd, silu_matmul_reference

KERNELS = ("xla", "pallas")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split tokens (as colax.sharding.BATCH_AXES)

__all__ = ["KERNELS", "Blocks", "TpuBlocks", "check_kernel", "cola_matmul", "cola_reference", "compiling_for",
           "default_blocks", "silu_matmul_any", "silu_matmul", "silu_matmul_bwd", "silu_matmul_fwd_kernel",
           "silu_matmul_fwd_tpu", "silu_matmul_reference", "silu_matmul_sharded", "target_platform"]


_TARGET = contextvars.ContextVar("colax_kernels_target", default=None)


@contextlib.contextmanager
def compiling_for(platform):
    """Within it, `target_platform()` is `platform` ("tpu"): the platform a step is lowered for when
    that is not this process's backend (`colax.plan --topology` compiles for TPU on a CPU host).
    jax's tracing caches do not know it: trace a fresh function (a new `jax.jit`) inside it."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform():
    """The platform the kernels are traced for: the `compiling_for` one, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()


def check_kernel(kernel, interpret=False):
    """ConfigError (one line) unless `kernel` is known and can run on the target platform."""
    if kernel not in KERNELS:
        raise ConfigError(f"model.kernel must be one of {list(KERNELS)}, got {kernel!r}")
    platform = target_platform()
    if kernel == "pallas" and platform not in ("gpu", "tpu") and not interpret:
        raise ConfigError(f"model.kernel='pallas' needs a GPU or a TPU (found {platform}); use 'xla'")


def default_blocks():
    """The Pallas kernel of the target platform, by its tile sizes: `TpuBlocks()` (Mosaic) on a TPU,
    else `Blocks()` (Triton: a GPU, or interpret mode on CPU)."""
    return TpuBlocks() if target_platform() == "tpu" else Blocks()


def _batch_axes(mesh):
    """The token-splitting axes of the context mesh that have more than one device."""
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def cola_matmul(x, a, b, *, kernel, interpret=None, blocks=None):
    """The CoLA projection silu(x @ A) @ B. x: [..., I], A: [I, R], B: [R, O] -> [..., O], x's dtype.

    A and B are cast to x's dtype; z = x @ A is tagged "cola_z", then `silu_matmul_any` runs.
    """
    z = checkpoint_name(matmul(x, a.astype(x.dtype)), "cola_z")
    return silu_matmul_any(z, b.astype(x.dtype), kernel=kernel, interpret=interpret, blocks=blocks)


def silu_matmul_any(z, b, *, kernel, interpret=None, blocks=None):
    """silu(z) @ B with the chosen kernel. z: [..., R], B: [R, O] -> [..., O], z's dtype.

    kernel: "xla" (tags h = silu(z) "cola_h") or "pallas"; `blocks` picks the Pallas kernel and its
    tiles (`Blocks`: Triton, `TpuBlocks`: Mosaic; default `default_blocks()`); `interpret` (default
    `cola_pallas.INTERPRET`) runs it in interpret mode, e.g. on CPU. Under a context
    mesh (`jax.set_mesh`) whose "data"/"fsdp" axes split z's leading axis, the kernel runs per
    device via `silu_matmul_sharded`.
    """
    interpret = cola_pallas.INTERPRET if interpret is None else interpret
    check_kernel(kernel, interpret)
    if kernel == "xla":
        return matmul(checkpoint_name(jax.nn.silu(z), "cola_h"), b)
    blocks = blocks or default_blocks()
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else _batch_axes(mesh)
    if axes and z.ndim > 1:
        return silu_matmul_sharded(z, b, mesh, axes, blocks, interpret)
    y = silu_matmul(z.reshape(-1, z.shape[-1]), b, blocks, interpret)
    return y.reshape(*z.shape[:-1], b.shape[1])
