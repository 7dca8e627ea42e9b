"""Collective bytes per decoder block per token under tensor parallelism, read off the compiled HLO.

  python benchmarks/collectives.py [--tensor 2 4 8] [--size 60m] [--batch 2] [--seq-len 64]

Runs on simulated CPU devices (it sets XLA_FLAGS itself). For full-rank (Megatron layout) and
CoLA, on a (1, 1, tensor) mesh, it compiles the forward loss and the training step (AdamW) of the
preset at --size with 1 and 2 unrolled layers; the difference is one block. Bytes are the operand
bytes of every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute in
`compiled.as_text()`, per device, divided by batch x seq_len tokens.
"""

import argparse
import math
import os
import re
import sys

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DEF = re.compile(r"%(\S+) = ([a-z]+\d*)\[([\d,]*)\]")
_OP = re.compile(r"\b(%s)(?:-start)?\((%%[^)]*)\)" % "|".join(COLLECTIVES))
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(hlo_text):
    """{collective: operand bytes} summed over the HLO module text of a compiled executable."""
    hlo_text = re.sub(r"/\*.*?\*/", "", hlo_text)
    sizes = {}
    for name, dtype, dims in _DEF.findall(hlo_text):
        sizes[name] = _BYTES[dtype] * math.prod(int(d) for d in filter(None, dims.split(",")))
    totals = dict.fromkeys(COLLECTIVES, 0)
    for op, operands in _OP.findall(hlo_text):
        totals[op] += sum(sizes[o.strip().lstrip("%")] for o in operands.split(","))
    return totals


def step_bytes(kind, size, tensor, layers, batch, seq_len):
    """(forward, train) collective bytes of the preset on a (1, 1, tensor) mesh."""
    import jax
    import numpy as np
    from flax import nnx
    from colax import config, model, optim, sharding, state, step

    cfg = config.preset(kind, size)
    cfg.model.update(num_layers=layers, scan_layers=False, vocab_size=256)
    cfg.mesh.update(data=1, fsdp=1, tensor=tensor)
    spec = model.spec_from_config(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:tensor])
    tx = optim.make(cfg.optim, cfg.train.steps)
    params, opt_state = state.abstract_state(spec, tx, mesh)
    graphdef = nnx.graphdef(model.abstract_model(spec))
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), np.int32, sharding=sharding.batch_sharding(mesh))
    batches = dict(inputs=tokens, targets=tokens,
                   loss_mask=jax.ShapeDtypeStruct(tokens.shape, np.float32, sharding=tokens.sharding))
    train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
    forward = jax.jit(sharding.on_mesh(lambda p, b: step.loss_sums(p, graphdef, jax.tree.map(lambda x: x[0], b)),
                                       mesh))
    return tuple(sum(collective_bytes(f.lower(*args).compile().as_text()).values())
                 for f, args in ((forward, (params, batches)), (train, (params, opt_state, batches))))


def per_block_per_token(kind, size, tensor, batch, seq_len):
    """(forward, train) collective bytes of one block per token per device."""
    one, two = (step_bytes(kind, size, tensor, n, batch, seq_len) for n in (1, 2))
    return tuple((b - a) / (batch * seq_len) for a, b in zip(one, two))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tensor", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--size", default="60m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(args.tensor)}"
    assert "jax" not in sys.modules
    print("| tensor | full-rank fwd | CoLA fwd | full-rank train | CoLA train | CoLA / full-rank (train) |")
    print("|---|---|---|---|---|---|")
    for t in args.tensor:
        (df, dt), (cf, ct) = (per_block_per_token(k, args.size, t, args.batch, args.seq_len)
                              for k in ("llama", "cola"))
        print(f"| {t} | {df:.0f} | {cf:.0f} | {dt:.0f} | {ct:.0f} | {ct / dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()
