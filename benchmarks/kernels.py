"""Forward and forward+backward time of the CoLA projection: XLA reference vs the Pallas kernel.

  python benchmarks/kernels.py [--tokens 8192 32768] [--iters 20] [--json results.json]
  python benchmarks/kernels.py --interpret --small      # CPU: tiny shapes, checks the script only

Times `cola_matmul(x, A, B, kernel=...)` in bf16 at the paper's shapes (1B: d=2048, r=512,
F=5461; 7B: d=4096, r=1024, F=11008) for a q-like [d->d], an up-like [d->F] and a down-like [F->d]
projection. Both kernels run side by side in one process: one warmup call, then the median of
--iters calls, each ended by block_until_ready. "fwd+bwd" is y plus the vjp (dx, dA, dB).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from colax.kernels import Blocks, cola_matmul

MODELS = {"1B": (2048, 512, 5461), "7B": (4096, 1024, 11008)}  # (hidden d, rank r, intermediate F)
SMALL = {"tiny": (64, 16, 96)}


def projections(d, f):
    """{name: (in, out)} of the three projection shapes timed per model."""
    return {"q": (d, d), "up": (d, f), "down": (f, d)}


def median_ms(fn, args, iters):
    """Median wall time of fn(*args) in milliseconds, after one warmup (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def programs(kernel, interpret, blocks):
    """(forward, forward+backward) jitted functions of (x, A, B, dy) for one kernel."""
    proj = lambda x, a, b: cola_matmul(x, a, b, kernel=kernel, interpret=interpret, blocks=blocks)

    def fwd_bwd(x, a, b, dy):
        y, vjp = jax.vjp(proj, x, a, b)
        return y, vjp(dy)

    return jax.jit(lambda x, a, b, dy: proj(x, a, b)), jax.jit(fwd_bwd)


def inputs(n, r, d_in, d_out):
    """bf16 x [n, d_in], A [d_in, r], B [r, d_out], dy [n, d_out] with the paper's init scale."""
    kx, ka, kb, ky = jax.random.split(jax.random.key(0), 4)
    std = (r * (d_in + d_out)) ** -0.25
    normal = lambda k, shape, s=1.0: (s * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16)
    return normal(kx, (n, d_in)), normal(ka, (d_in, r), std), normal(kb, (r, d_out), std), normal(ky, (n, d_out))


def run(models, tokens, iters, interpret, blocks):
    """One row per (model, projection, tokens, pass) with both kernels' median times."""
    rows = []
    progs = {k: programs(k, interpret, blocks) for k in ("xla", "pallas")}
    for model, (d, r, f) in models.items():
        for name, (d_in, d_out) in projections(d, f).items():
            for n in tokens:
                args = inputs(n, r, d_in, d_out)
                for i, mode in enumerate(("fwd", "fwd+bwd")):
                    ms = {k: median_ms(p[i], args, iters) for k, p in progs.items()}
                    rows.append(dict(model=model, proj=name, d_in=d_in, d_out=d_out, rank=r, tokens=n,
                                     mode=mode, xla_ms=ms["xla"], pallas_ms=ms["pallas"],
                                     speedup=ms["xla"] / ms["pallas"]))
                    print_row(rows[-1])
    return rows


def print_row(row):
    shape = f"{row['d_in']}->{row['d_out']} r{row['rank']}"
    print(f"{row['model']:<5} {row['proj']:<5} {shape:<18} {row['tokens']:>7} {row['mode']:<8} "
          f"{row['xla_ms']:>9.3f} {row['pallas_ms']:>10.3f} {row['speedup']:>8.2f}x", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (with --small on CPU)")
    p.add_argument("--small", action="store_true", help="tiny shapes (64->96, r=16, 100 tokens)")
    p.add_argument("--block-n", type=int, default=Blocks.block_n)
    p.add_argument("--block-out", type=int, default=Blocks.block_out)
    p.add_argument("--block-r", type=int, default=Blocks.block_r)
    p.add_argument("--num-warps", type=int, default=Blocks.num_warps)
    p.add_argument("--num-stages", type=int, default=Blocks.num_stages)
    args = p.parse_args()
    backend = jax.default_backend()
    if backend != "gpu" and not (args.interpret and args.small):
        sys.exit(f"benchmarks/kernels.py times GPU kernels and found {backend}; "
                 "on CPU only `--interpret --small` runs (a check of the script, not a timing)")
    blocks = Blocks(args.block_n, args.block_out, args.block_r, args.num_warps, args.num_stages)
    models, tokens = (SMALL, [100]) if args.small else (MODELS, args.tokens)
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, bf16, {blocks}, median of {args.iters}"
          f"{' (interpret mode: not a timing)' if args.interpret else ''}")
    print(f"{'model':<5} {'proj':<5} {'shape':<18} {'tokens':>7} {'pass':<8} {'xla_ms':>9} {'pallas_ms':>10} "
          f"{'speedup':>9}")
    rows = run(models, tokens, args.iters, args.interpret, blocks)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device, jax=jax.__version__, interpret=args.interpret,
                           blocks=dataclasses.asdict(blocks), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
