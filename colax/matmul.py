"""`matmul(x, w)`: the model's projection matmul, x @ w in x's dtype.

On the CPU backend it is a custom VJP making two choices that XLA:CPU (measured on jaxlib 0.10)
does not make well by itself (docs/cpu_performance.md):

- every dot accumulates in float32 (`preferred_element_type`): a bfloat16 x bfloat16 -> bfloat16
  dot runs there as a float32 dot with both operands converted, a bf16 x bf16 -> f32 dot natively.
  The numbers are those of XLA's upcast (bf16 products are exact in f32), rounded once to bf16.
- the weight gradient x^T @ dy contracts over the tokens, so XLA copies one operand into a
  [features, tokens] layout first, with the elementwise backward that produces it fused into that
  copy, where it runs in transposed order. JAX's transpose rule picks the operand by argument order;
  here the narrower of x [..., I] and dy [..., O] is the one copied (I <= O: x^T @ dy, else
  (dy^T @ x)^T, whose [O, I] result is weight-sized). CoLA's [in, r] and [r, out] factors are
  always one wide and one narrow side. An optimization barrier keeps XLA from folding that last
  transpose into the dot: folded, it becomes a dot that XLA:CPU 0.10 runs on Eigen, which has
  no bf16 x bf16 -> f32 kernel ("Unsupported element type for DotThunk").

Other backends: a plain `x @ w`.
"""

import jax
import jax.numpy as jnp


def matmul(x, w):
    """x [..., I] @ w [I, O] -> [..., O], both in one dtype (the compute dtype), result in it."""
    if jax.default_backend() == "cpu":
        return _cpu_matmul(x, w)
    return x @ w


def _dot(a, b, contract, out=None):
    """dot_general contracting a's axes contract[0] with b's contract[1], accumulated in at least
    float32, in dtype `out` (default a's)."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    out = a.dtype if out is None else out
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=acc).astype(out)


@jax.custom_vjp
def _cpu_matmul(x, w):
    return _dot(x, w, ((x.ndim - 1,), (0,)))


def _fwd(x, w):
    return _cpu_matmul(x, w), (x, w)


def matmul_grads(x, w, dy):
    """The gradients of x @ w for its cotangent dy [..., O]: (dx = dy @ w^T in x's dtype, dw = x^T @ dy
    over every leading axis, accumulated in at least float32 and not rounded), the narrower of x
    and dy transposed for dw."""
    lead = tuple(range(x.ndim - 1))
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dx = _dot(dy, w, ((dy.ndim - 1,), (1,)))
    if x.shape[-1] <= dy.shape[-1]:
        dw = _dot(x, dy, (lead, lead), acc)
    else:
        dw = jax.lax.optimization_barrier(_dot(dy, x, (lead, lead), acc)).T
    return dx, dw


def _bwd(residuals, dy):
    x, w = residuals
    dx, dw = matmul_grads(x, w, dy)
    return dx, dw.astype(w.dtype)


_cpu_matmul.defvjp(_fwd, _bwd)
