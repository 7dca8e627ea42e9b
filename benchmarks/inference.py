"""Inference of full-rank LLaMA and CoLA of the same size side by side: speed and memory.

    python benchmarks/inference.py [--size tiny] [--vocab_size 2048] [--num_layers 0] [--prompt_len 64]
        [--new_tokens 32] [--batches 1,32] [--dtype float32] [--repeats 3]

Both models come from `config.preset(kind, size)` (random weights: speed does not depend on
them) and run through `colax.generate.generate`, the sampler of `python -m colax.generate`: greedy,
no EOS (every row makes `--new_tokens` tokens), cache length prompt_len + new_tokens. For each batch
size B, after one untimed call that compiles: prefill tokens/s = B * prompt_len / prefill time (one
pass over the prompts, including the first sampled token) and decode tokens/s = B * steps / their
time (one jitted step per token, host loop and stop checks included; `generate`'s
"decode_tokens_per_s", over the steps after the first), the best of
`--repeats` calls (alternating between the two models). Weight memory is the parameters' bytes; KV cache memory is what
`model.init_cache` allocates. Prints a markdown table with a CoLA / full-rank ratio column.
"""

import argparse
import os
import platform
import sys

import jax
import numpy as np
from flax import nnx

from colax import config, generate, model

KINDS = (("llama", "full-rank"), ("cola", "CoLA"))


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/inference.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=list(config.SIZES), help="preset size of both models")
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--num_layers", type=int, default=0, help="0: the preset's")
    p.add_argument("--prompt_len", type=int, default=64, help="a power of two >= 16 (then it is its own bucket)")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="float32", choices=list(model.DTYPES), help="compute and parameter dtype")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def build(kind, args):
    """(spec, graphdef, params) of the preset `kind` at the benchmark's size, random weights."""
    m = config.preset(kind, args.size).model
    m.update(vocab_size=args.vocab_size, dtype=args.dtype, param_dtype=args.dtype)
    if args.num_layers:
        m.num_layers = args.num_layers
    spec = model.spec_from_config(m)
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    return spec, graphdef, nnx.to_pure_dict(state)


def measure(args, batches):
    """{kind: {row name: value}} for every model and batch size. The repeats alternate between the
    models, so a change in the machine's load hits both alike; each figure is the best repeat."""
    max_len = args.prompt_len + args.new_tokens
    rng = np.random.RandomState(0)
    models = {kind: build(kind, args) for kind, _ in KINDS}
    out = {}
    for kind, (spec, _, params) in models.items():
        out[kind] = {"parameters (M)": model.count_params(spec)["total"] / 1e6,
                     "weights (MiB)": sum(a.nbytes for a in jax.tree.leaves(params)) / 2**20,
                     "forward MFLOPs / token": model.flops_per_token(spec, max_len)["forward"] / 1e6}
    for b in batches:
        prompts = [list(rng.randint(3, args.vocab_size, args.prompt_len)) for _ in range(b)]

        def run(kind):
            _, graphdef, params = models[kind]
            return generate.generate(params, graphdef, prompts, args.new_tokens, -1, max_len)[1]

        for kind in models:
            run(kind)  # compiles prefill and decode: not timed
        stats = {kind: [] for kind in models}
        for _ in range(args.repeats):
            for kind in models:
                stats[kind].append(run(kind))
        for kind, (spec, _, _) in models.items():
            cache = jax.eval_shape(lambda: model.init_cache(spec, b, max_len))
            out[kind][f"KV cache, batch {b} (MiB)"] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) / 2**20
            out[kind][f"prefill tokens/s, batch {b}"] = b * args.prompt_len / min(s["prefill_s"] for s in stats[kind])
            out[kind][f"decode tokens/s, batch {b}"] = max(s["decode_tokens_per_s"] for s in stats[kind])
    return out


def table(results):
    """Markdown: one row per measure, one column per model, then CoLA / full-rank."""
    lines = ["| | " + " | ".join(label for _, label in KINDS) + " | CoLA / full-rank |", "|---|---:|---:|---:|"]
    for name in results["llama"]:
        full, cola = results["llama"][name], results["cola"][name]
        lines.append(f"| {name} | {full:,.2f} | {cola:,.2f} | {cola / full:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    batches = [int(b) for b in args.batches.split(",")]
    results = measure(args, batches)
    spec = model.spec_from_config(config.preset("cola", args.size).model)
    print(f"command: python benchmarks/inference.py {' '.join(argv)}")
    print(f"machine: {jax.devices()[0].device_kind} x {jax.device_count()} ({platform.machine()}, "
          f"{os.cpu_count()} CPUs), jax {jax.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"size {args.size}: d={spec.hidden_size}, layers={args.num_layers or spec.num_layers}, "
          f"heads={spec.num_heads}, rank={spec.rank['q']}, vocab={args.vocab_size}, {args.dtype}; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
