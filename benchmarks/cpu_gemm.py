"""The GEMM floor of a CPU training step: every matrix product of the step's projections and lm_head
(forward, input gradient, weight gradient), each timed alone in XLA and in PyTorch, summed as the
step runs them. A step can be no faster than its GEMMs, so the floors say how much of each side's
step (`benchmarks/cpu_step.py`) is GEMM time and how much is everything else.

  python benchmarks/cpu_gemm.py                    # 60M, 8 x 256 tokens, float32, full-rank and CoLA
  python benchmarks/cpu_gemm.py --rows cola --rounds 3

Each side runs in a process of its own (`benchmarks/gemm_side.py`: XLA's never imports torch,
torch's never imports jax), the two alternating for `--rounds` rounds. Every product is in
`--dtype` (float32 by default) and timed as the step lays it out: forward x @ W (x [T, in], W [in,
out]), input gradient dy @ W^T, weight gradient x^T @ dy (XLA: a `dot_general` of the row-major
operands, as the step's HLO contracts them, accumulating in float32 as `colax.matmul`; PyTorch:
`.t()` views, as autograd passes them to its GEMM); the lm_head over all T tokens at once (colax's fused loss runs it in chunks of `xent.CHUNK_TOKENS`, the same FLOPs).
Attention's batched products (5 % of the full-rank 60M step's FLOPs, 7 % of CoLA's) and all
elementwise work are left out. Prints each side's time per product kind, its floor, and one
JSON line. Timing is in no test.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import step_common
from gemm_side import FORMS
from colax import config, host
from colax.projections.common import projection_shapes

ROWS = ("llama", "cola")
HAS_TORCH = importlib.util.find_spec("torch") is not None
HERE = Path(__file__).resolve().parent


def products(row, size):
    """[(name, in, out, count)]: the weight matrices of `row`'s step at `size` (the preset's sizes and
    rank), with how many of each the step multiplies by: per projection of `projection_shapes` its W
    (full-rank) or its A [in, r] and B [r, out] (CoLA), once per layer; the lm_head once."""
    m = config.validate(config.preset(row, size))
    count = {}
    for name, (i, o) in projection_shapes(m.hidden_size, m.intermediate_size).items():
        rank = m.rank[name]
        for key in ([(f"W {i}x{o}", i, o)] if row == "llama" else [(f"A {i}x{rank}", i, rank), (f"B {rank}x{o}", rank, o)]):
            count[key] = count.get(key, 0) + m.num_layers
    count[(f"lm_head {m.hidden_size}x{m.vocab_size}", m.hidden_size, m.vocab_size)] = 1
    return [(*key, c) for key, c in count.items()]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_gemm.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--size", default="60m", choices=list(config.SIZES))
    p.add_argument("--tokens", type=int, default=8 * 256, help="tokens a step (batch x seq_len)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each product per process")
    p.add_argument("--rounds", type=int, default=2, help="XLA / torch process pairs, alternating order")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="operands and result")
    args = p.parse_args(argv)
    if not HAS_TORCH:
        sys.exit("error: the torch side needs the parity extra (pip install -e '.[parity]')")
    host.reuse_freed_memory()  # here for its JAX_PLATFORMS=cpu where an idle libtpu is installed
    shapes = {row: products(row, args.size) for row in args.rows.split(",")}
    every = sorted({s for rows in shapes.values() for s in rows})
    load_before = step_common.load_average()
    runs = {"xla": [], "torch": []}
    for r in range(args.rounds):
        for side in (("xla", "torch") if r % 2 == 0 else ("torch", "xla")):
            print(f"round {r}: {side} ({len(every)} products x {len(FORMS)} forms)", file=sys.stderr, flush=True)
            cmd = [sys.executable, str(HERE / "gemm_side.py"), side, f"--shapes={json.dumps(every)}",
                   f"--tokens={args.tokens}", f"--repeats={args.repeats}", f"--dtype={args.dtype}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"error: the {side} process failed (exit {done.returncode}): {tail}")
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for row, rows in shapes.items():
        print(f"{row}: {args.dtype} seconds a step ({args.tokens} tokens), xla / torch, median of {args.rounds} rounds")
        floor = {"xla": 0.0, "torch": 0.0}
        for name, i, o, count in rows:
            cells = []
            for form in FORMS:
                key = f"{name} {form}"
                t = {s: statistics.median(run[key] for run in runs[s]) * count for s in runs}
                floor = {s: floor[s] + t[s] for s in floor}
                cells.append(f"{form} {t['xla']:.3f}/{t['torch']:.3f}")
            print(f"  {name:14s} x{count:<3d} " + "  ".join(cells))
        flops = sum(3 * 2 * args.tokens * i * o * count for _, i, o, count in rows)
        print(f"  GEMM floor ({flops / 1e9:.0f} GFLOP): xla {floor['xla']:.2f} s ({flops / floor['xla'] / 1e9:.0f} GFLOP/s), "
              f"torch {floor['torch']:.2f} s ({flops / floor['torch'] / 1e9:.0f} GFLOP/s)")
        summary[row] = dict(floor, gflop=flops / 1e9)
    print(json.dumps({"floor": summary, "load_before": load_before, "load_after": step_common.load_average()}))


if __name__ == "__main__":
    main()
