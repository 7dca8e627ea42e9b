"""One side of benchmarks/cpu_gemm.py in this process: each product's forward, input-gradient and
weight-gradient GEMM timed alone in XLA or PyTorch (never both in one process: the torch side
imports neither jax nor colax and leaves malloc alone), printed as one JSON line {"<name> <form>":
median seconds}.

  python benchmarks/gemm_side.py xla|torch --shapes '[["W 512x512", 512, 512, 32], ...]' --tokens 2048
"""

import argparse
import json
import os
import statistics

import numpy as np

import step_common

FORMS = ("forward", "input_grad", "weight_grad")


def xla_forms(x, w, dy, dtype="float32"):
    """{form: a function computing it}: x @ w, dy @ w^T, x^T @ dy as jitted `dot_general`s of the
    row-major operands (x [T, in], w [in, out], dy [T, out]: float32 numpy arrays) cast to `dtype`,
    accumulated in float32 and rounded to `dtype` once, as `colax.matmul` runs a bf16 dot on CPU."""
    import jax  # pylint: disable=import-outside-toplevel

    def dot(a, b, contract):
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (contract, ((), ())),
                                                     preferred_element_type=jax.numpy.float32).astype(a.dtype))
        a, b = jax.numpy.asarray(a, dtype), jax.numpy.asarray(b, dtype)
        return lambda: f(a, b).block_until_ready()

    return dict(forward=dot(x, w, ((1,), (0,))), input_grad=dot(dy, w, ((1,), (1,))),
                weight_grad=dot(x, dy, ((0,), (0,))))


def torch_forms(x, w, dy, dtype="float32"):
    """The same products in PyTorch, with `.t()` views as autograd passes them to its GEMM."""
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
    x, w, dy = (torch.from_numpy(a).to(getattr(torch, dtype)) for a in (x, w, dy))
    return dict(forward=lambda: x @ w, input_grad=lambda: dy @ w.t(), weight_grad=lambda: x.t() @ dy)


def median_seconds(fn, repeats, label):
    """The median seconds of `repeats` timed calls of fn after two untimed ones (`step_common.timed_steps`)."""
    _, samples = step_common.timed_steps(lambda: (fn(), 0.0)[1], 2, repeats, label)
    return statistics.median(seconds for seconds, _ in samples)


def time_side(side, tokens, shapes, repeats, dtype="float32"):
    """{f"{name} {form}": seconds of one product} on `side` ("xla" or "torch") in `dtype` ("float32"
    or "bfloat16"); shapes: [(name, in, out, count)]."""
    make = xla_forms if side == "xla" else torch_forms
    rng = np.random.default_rng(0)
    out = {}
    for name, i, o, _ in shapes:
        forms = make(*(rng.standard_normal(s, np.float32) for s in ((tokens, i), (i, o), (tokens, o))), dtype)
        for form in FORMS:
            out[f"{name} {form}"] = median_seconds(forms[form], repeats, f"{side} {name} {form}")
    return out


def main():
    p = argparse.ArgumentParser(prog="python benchmarks/gemm_side.py", description=__doc__.split("\n")[0])
    p.add_argument("side", choices=["xla", "torch"])
    p.add_argument("--shapes", required=True, help="[[name, in, out, count], ...] as JSON")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.side == "xla":  # train.py's malloc setting, as cpu_step's colax process
        from colax import host  # pylint: disable=import-outside-toplevel
        host.reuse_freed_memory()
    print(json.dumps(time_side(args.side, args.tokens, json.loads(args.shapes), args.repeats, args.dtype)))


if __name__ == "__main__":
    main()
