"""SLTrain's sparse part `y = x @ S` in XLA: scatter-into-dense vs gather/segment-sum, side by side.

  python benchmarks/sparse_matmul.py [--size 60m] [--tokens 2048] [--iters 5] [--dtype bfloat16] [--batch 8]
      [--seq_len 256]

S [in, out] has nnz = round(0.03 * in * out) trained values on a fixed, sorted support of flat
indices (colax.projections.sltrain.SLTrain). Three formulations of the same product, timed for the projection
shapes of one preset size (q [d->d], up [d->F], down [F->d]) on the default backend:

- scatter: S written into a dense [in, out] zero matrix (`.at[idx].set`), then one dense matmul;
  the values' gradient is a gather of the dense [in, out] gradient `x^T dy`.
- gather (row-sorted): x's columns gathered at each entry's row [N, nnz], times the values, summed
  into the output columns with `segment_sum` (indices as stored: sorted by row, not by column).
- gather (col-sorted): the same with the support reordered by column, so `segment_sum` gets sorted
  segments (the best case for this formulation; it would cost a second index array).

One warmup (compile) call, then the median of --iters calls. "fwd+bwd" is y plus the vjp (dx, dS
values). Prints one table; the ratio columns are against scatter.

A second table compiles the gradient of the whole SLTrain model of --size (`colax.step.grads`,
one micro-batch of --batch x --seq_len, abstract shapes, nothing run) with `sltrain.sltrain_matmul`
as colax has it (checkpointed: the backward rebuilds W) and with W kept for the backward (the
same function without jax.checkpoint): XLA's temporary memory and FLOPs.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from colax import config, model, step
from colax.projections import common, sltrain
from kernels import median_ms  # benchmarks/kernels.py (this script's directory is on sys.path)


def scatter(x, values, idx, shape):
    """x [N, in] @ S: S scattered into a dense [in, out] matrix. idx: sorted row-major flat indices."""
    dense = jnp.zeros(shape[0] * shape[1], values.dtype).at[idx].set(
        values, indices_are_sorted=True, unique_indices=True).reshape(shape)
    return x @ dense.astype(x.dtype)


def gather(x, values, idx, shape):
    """x [N, in] @ S as a gather of x's columns and a segment sum over S's columns.

    idx: sorted row-major flat indices (row * out + col), as stored."""
    rows, cols = idx // shape[1], idx % shape[1]
    contrib = x[:, rows] * values.astype(x.dtype)  # [N, nnz]
    return jax.ops.segment_sum(contrib.T, cols, num_segments=shape[1]).T


def gather_col_sorted(x, values, idx, shape):
    """`gather` with idx sorted column-major (col * in + row), so the segments come sorted."""
    rows, cols = idx % shape[0], idx // shape[0]
    contrib = x[:, rows] * values.astype(x.dtype)
    return jax.ops.segment_sum(contrib.T, cols, num_segments=shape[1], indices_are_sorted=True).T


# name: (formulation, flat index of entry (row, col) in the order that formulation stores the support)
FORMS = {"scatter": (scatter, lambda r, c, shape: r * shape[1] + c),
         "gather (row-sorted)": (gather, lambda r, c, shape: r * shape[1] + c),
         "gather (col-sorted)": (gather_col_sorted, lambda r, c, shape: c * shape[0] + r)}


def programs(form, shape):
    """(forward, forward+backward) jitted functions of (x, values, idx, dy)."""
    fn = lambda x, v, i: FORMS[form][0](x, v, i, shape)

    def fwd_bwd(x, v, i, dy):
        y, vjp = jax.vjp(lambda x, v: fn(x, v, i), x, v)
        return y, vjp(dy)

    return jax.jit(fn), jax.jit(fwd_bwd)


def inputs(n, shape, dtype, density=0.03):
    """x [n, in], dy [n, out] and {form: (values [nnz] fp32, sorted unique idx int32 [nnz])}: the same
    entries of S, each in the order its formulation stores them."""
    rng = np.random.default_rng(0)
    nnz = round(density * shape[0] * shape[1])
    flat = rng.choice(shape[0] * shape[1], nnz, replace=False)
    rows, cols = flat // shape[1], flat % shape[1]
    values = rng.uniform(-1, 1, nnz) / np.sqrt(shape[0])
    support = {}
    for name, (_, encode) in FORMS.items():
        idx = encode(rows, cols, shape)
        order = np.argsort(idx)
        support[name] = (jnp.asarray(values[order], jnp.float32), jnp.asarray(idx[order], jnp.int32))
    x = jnp.asarray(rng.standard_normal((n, shape[0])), dtype)
    return x, jnp.asarray(rng.standard_normal((n, shape[1])), dtype), support


def grad_cost(cfg, batch, seq_len, matmul):
    """(temp MiB, XLA FLOPs) of the compiled gradient of the model of `cfg` with `matmul` as the
    SLTrain product."""
    saved, sltrain.sltrain_matmul = sltrain.sltrain_matmul, matmul
    try:
        spec = model.spec_from_config(cfg.model)
        graphdef, state = nnx.split(model.abstract_model(spec))
        tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
        batches = dict(inputs=tokens, targets=tokens, loss_mask=jax.ShapeDtypeStruct(tokens.shape, jnp.float32))
        compiled = jax.jit(lambda p, b: step.grads(p, graphdef, b)).lower(nnx.to_pure_dict(state), batches).compile()
    finally:
        sltrain.sltrain_matmul = saved
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, cost["flops"]


def memory_table(size, batch, seq_len):
    cfg = config.preset("sltrain", size)
    forms = {"checkpointed (colax)": sltrain.sltrain_matmul, "W kept": sltrain.sltrain_matmul.__wrapped__}
    costs = {name: grad_cost(cfg, batch, seq_len, fn) for name, fn in forms.items()}
    base_mib, base_flops = costs["checkpointed (colax)"]
    print(f"\nSLTrain {size} gradient, one micro-batch of {batch} x {seq_len} (compiled, not run)\n")
    print("| sltrain_matmul | temp MiB | x | GFLOPs | x |\n|---|---:|---:|---:|---:|")
    for name, (mib, flops) in costs.items():
        print(f"| {name} | {mib:.0f} | {mib / base_mib:.2f} | {flops / 1e9:.1f} | {flops / base_flops:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="60m", choices=list(sltrain.ALPHA))
    p.add_argument("--tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=8, help="micro-batch rows of the memory table")
    p.add_argument("--seq_len", type=int, default=256, help="sequence length of the memory table")
    args = p.parse_args()
    d, f = config.SIZES[args.size][:2]
    shapes = {k: v for k, v in common.projection_shapes(d, f).items() if k in ("q", "up", "down")}
    names = list(FORMS)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.size}, {args.dtype}, "
          f"median of {args.iters}; ms (x: ratio to scatter)\n")
    print("| proj | in x out | nnz | tokens | pass | " + " | ".join(f"{n} ms | x" for n in names) + " |")
    print("|---|---|---:|---:|---|" + "---:|---:|" * len(names))
    for name, shape in shapes.items():
        for n in args.tokens:
            x, dy, support = inputs(n, shape, jnp.dtype(args.dtype))
            nnz = support["scatter"][1].size
            for mode in (0, 1):
                ms = [median_ms(programs(k, shape)[mode], (x, *support[k], dy)[:4 if mode else 3], args.iters)
                      for k in names]
                cells = " | ".join(f"{m:.1f} | {m / ms[0]:.2f}" for m in ms)
                print(f"| {name} | {shape[0]}x{shape[1]} | {nnz} | {n} | {('fwd', 'fwd+bwd')[mode]} "
                      f"| {cells} |", flush=True)
    memory_table(args.size, args.batch, args.seq_len)


if __name__ == "__main__":
    main()
