"""colax's training step against PyTorch's on the CPU: forward + backward + AdamW, each side in a
process of its own, as its users run it; tokens/s side by side.

    python benchmarks/cpu_step.py [--size 60m] [--batch 8] [--seq_len 256] [--warmup 2] [--steps 5]
        [--rounds 2] [--rows llama,cola,cola_m] [--dtypes float32,bfloat16] [--no_torch]
        [--torch_threads N] [--torch_malloc system|colax] [--torch_attention sdpa|eager]
        [--cola_repo PATH] [--same_process] [--config.a.b=v ...]

Per row (model x dtype) colax's step is the jitted step `train.py` runs (`colax.trainer.Trainer` on
the state of `colax.state.init_state`, built from the preset `config.preset(kind, size)` with the
batch set to one micro-batch of --batch x --seq_len), in a process that sets glibc's malloc as
train.py does (`colax.host`; COLAX_MALLOC=system leaves it). PyTorch's is benchmarks/torch_step.py
on the same model at the same sizes, in a process that imports no jax and leaves malloc alone:
transformers' LlamaForCausalLM (llama), the authors' CoLA forward transcribed in tests/official/cola.py
(cola) and cut into their CoLA-M checkpoint segments (cola_m), both with the sdpa attention the
authors' models get by default; with --cola_repo, the authors' own model classes. Both start from
colax's initial weights (the authors' CoLA-M from its own init), take the same uniform random
tokens, the summed-then-averaged token cross-entropy, global-norm clipping at the preset's
`optim.grad_clip` and AdamW at the preset's lr, betas, eps and weight decay. float32: parameters and
compute in fp32; bfloat16: pure bf16 (colax param_dtype and dtype bfloat16, torch
`model.to(bfloat16)`), the paper's mode.

Default: per dtype and row, --rounds rounds; each round runs a colax process and a torch process one
after the other (colax first in even rounds, torch first in odd ones); each process compiles / warms
up (--warmup steps) then times --steps steps. Printed: every timed step as a JSON line (step_common),
each process's summary, the load average before and after each row and at the end, then the table:
per side the median step over all rounds and the spread between rounds (max / min of the rounds'
medians), colax / torch speed (torch's median step over colax's), CoLA (CoLA-M) / full-rank within
colax, and one JSON line with all of it ({"table": [...]}).

Diagnostics, to take the differences apart: --torch_malloc colax (colax.host's malloc setting in the
torch process), --torch_attention eager|sdpa, --torch_threads N, and --same_process: the old mode,
both sides in this one process (colax.host's malloc for both, torch after XLA's threads have
started), every row's two steps of a dtype warmed up, then timed in turn for --rounds rounds.

Needs torch and transformers (the `parity` extra); without them only colax's column is printed.
Nothing here is asserted: CPU timing is in no test (docs/cpu_performance.md has the measured tables).
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import step_common
from colax import config, convert, host, loop, sharding, state, trainer
from colax import model as model_lib

ROWS = {"llama": ("llama", "none"), "cola": ("cola", "none"), "cola_m": ("cola", "cola_m")}  # kind, remat
HERE = Path(__file__).resolve().parent
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def parse(argv):
    """(args, [(dotted key, value)]): `--config.a.b=v` pairs are applied to every colax config last
    (args.config keeps them as given, for the child processes)."""
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="60m", choices=list(config.SIZES))
    p.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side per process (after compiling)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each side per round")
    p.add_argument("--rounds", type=int, default=2, help="A B / B A rounds per row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of float32, bfloat16")
    p.add_argument("--no_torch", action="store_true", help="time colax only")
    p.add_argument("--torch_threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--torch_malloc", default="system", choices=["system", "colax"],
                   help="the torch process's glibc malloc: untouched, or colax.host's (a diagnostic)")
    p.add_argument("--torch_attention", choices=step_common.ATTENTION, help="default: the model's (sdpa)")
    p.add_argument("--cola_repo", help="a clone of alvin-zyl/CoLA: torch times the authors' model classes")
    p.add_argument("--same_process", action="store_true", help="diagnostic: both sides in this process")
    p.add_argument("--spec", action="store_true", help="print the first row's torch_step spec as JSON and exit")
    p.add_argument("--child", action="store_true", help="(internal) time colax's first row in this process")
    p.add_argument("--weights_out", help="(internal, --child) write the initial weights here as .npz")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        key, sep, value = item.removeprefix("--config.").partition("=")
        if not item.startswith("--config.") or not sep:
            p.error(f"unrecognized argument {item}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        overrides.append((key, value))
    args.config = rest
    return args, overrides


def colax_config(name, size, dtype, batch, seq_len, overrides):
    """The preset of row `name` with one micro-batch of batch x seq_len and pure `dtype`."""
    kind, policy = ROWS[name]
    cfg = config.preset(kind, size)
    cfg.model.update(remat=policy, dtype=dtype, param_dtype=dtype)
    cfg.train.update(batch_size=batch, micro_batch_size=batch)
    cfg.optim.warmup_steps = 0  # the peak lr from the first step, as torch's constant-lr AdamW
    cfg.data.seq_len = seq_len
    for key, value in overrides:
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def spec(cfg):
    """The sizes and recipe torch_step builds its model and optimizer from (JSON-able)."""
    m, o = cfg.model, cfg.optim
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_layers=m.num_layers, num_heads=m.num_heads, rank=m.rank, only_lr_act=m.only_lr_act,
                norm_eps=m.norm_eps, rope_theta=m.rope_theta, dtype=m.dtype, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
                weight_decay=o.weight_decay, grad_clip=o.grad_clip)


def colax_step(cfg, tokens):
    """(a function running one training step of `cfg` as train.py does (`loop._train`) to completion,
    the initial parameters as a pure dict)."""
    spec = config.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    tr = trainer.Trainer(cfg, nnx.graphdef(model_lib.abstract_model(spec)), mesh)
    _, params, opt_state = state.init_state(spec, tr.tx(0), mesh, cfg.train.seed)
    host = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones(tokens[:, 1:].shape, np.float32))
    batches = loop.device_batch(host, config.accum_steps(cfg), mesh)
    initial = jax.tree.map(np.asarray, params)
    holder = dict(params=params, opt_state=opt_state, s=0)

    def run():
        holder["s"] += 1
        holder["params"], holder["opt_state"], m = tr(holder["s"], holder["params"], holder["opt_state"], batches)
        return float(jax.block_until_ready(m["loss"]))

    return run, initial


def torch_tensors(name, params):
    """colax's `params` as the torch side's float32 state dict (the authors' / Hugging Face names)."""
    fmt = "llama" if name == "llama" else "cola"
    return {k: np.array(v, np.float32) for k, v in convert.to_tensors(params, fmt).items()}


def colax_child(args, overrides):
    """This process times colax's step of the first of --rows at the first of --dtypes (one side
    of one round): step_common's JSON lines; --weights_out gets the initial weights first."""
    kept = host.reuse_freed_memory()  # before the first step starts JAX's threads, as train.py
    name, dtype = args.rows.split(",")[0], args.dtypes.split(",")[0]
    cfg = colax_config(name, args.size, dtype, args.batch, args.seq_len, overrides)
    tokens = step_common.random_tokens(cfg.model.vocab_size, args.batch, args.seq_len)
    run, params = colax_step(cfg, tokens)
    if args.weights_out and not os.path.exists(args.weights_out):
        partial = f"{args.weights_out}.partial.npz"
        np.savez(partial, **torch_tensors(name, params))
        os.replace(partial, args.weights_out)
    settings = dict(threads=os.cpu_count(), jax=jax.__version__, malloc="colax.host" if kept else "system",
                    xla_flags=os.environ.get("XLA_FLAGS", ""))
    step_common.report(run, args.warmup, args.steps, dict(side="colax", row=name, dtype=dtype), settings)


def run_child(cmd, label, extra):
    """Runs one timing process; re-prints its JSON lines with `extra` ({"round": r}) added and returns
    its summary. A process that fails stops the benchmark naming `label`."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{label}: the timing process exited with {proc.returncode}")
    summary = None
    for line in proc.stdout.splitlines():
        record = dict(json.loads(line), **extra) if line.startswith("{") else None
        if record is None:
            continue
        step_common.emit(record)
        summary = record if record.get("summary") else summary
    return summary


def child_commands(args, name, dtype, cfg, weights):
    """{side: the command line of one process timing that side of row `name` at `dtype`}."""
    common = ["--batch", str(args.batch), "--seq_len", str(args.seq_len), "--warmup", str(args.warmup),
              "--steps", str(args.steps)]
    colax = [sys.executable, str(HERE / "cpu_step.py"), "--child", "--rows", name, "--dtypes", dtype,
             "--size", args.size, *common, *args.config]
    if args.no_torch:
        return {"colax": colax}
    torch = [sys.executable, str(HERE / "torch_step.py"), "--row", name, "--dtype", dtype, *common,
             "--threads", str(args.torch_threads), "--malloc", args.torch_malloc, "--spec", json.dumps(spec(cfg))]
    torch += ["--attention", args.torch_attention] if args.torch_attention else []
    torch += ["--cola_repo", args.cola_repo] if args.cola_repo else []
    if not (args.cola_repo and name == "cola_m"):  # the authors' CoLA-M takes its own init
        colax += ["--weights_out", weights]
        torch += ["--weights", weights]
    return {"colax": colax, "torch": torch}


def separate(args, overrides):
    """The default mode: {(row, dtype): row record} of every row and dtype, each side timed in
    processes of its own, in rounds of alternating order."""
    table = {}
    with tempfile.TemporaryDirectory(prefix="cpu_step-") as tmp:
        for dtype in args.dtypes.split(","):
            for name in args.rows.split(","):
                cfg = colax_config(name, args.size, dtype, args.batch, args.seq_len, overrides)
                commands = child_commands(args, name, dtype, cfg, os.path.join(tmp, f"{name}-{dtype}.npz"))
                load_before = step_common.load_average()
                step_common.emit(dict(row=name, dtype=dtype, load_before=load_before))
                summaries = {side: [] for side in commands}
                for r in range(args.rounds):
                    for side in sorted(commands, reverse=r % 2 == 1):  # colax, torch; then torch, colax
                        summary = run_child(commands[side], f"{name} {dtype} {side}", dict(round=r))
                        summaries[side].append(summary)
                table[name, dtype] = row_record(name, dtype, summaries, load_before, step_common.load_average())
                step_common.emit(dict(row=name, dtype=dtype, load_after=table[name, dtype]["load_after"]))
    return table


def row_record(name, dtype, summaries, load_before, load_after):
    """A row's figures from its processes' summaries ({side: [summary of each round]}): per side the
    median step over all its samples, the rounds' medians and their spread (max / min), the first loss."""
    record = dict(row=name, dtype=dtype, load_before=load_before, load_after=load_after)
    for side, rounds in summaries.items():
        medians = [s["median"] for s in rounds]
        record[side] = dict(median=statistics.median(x for s in rounds for x in s["samples"]), round_medians=medians,
                            spread=max(medians) / min(medians), first_loss=rounds[0]["first_loss"],
                            settings={k: v for k, v in rounds[0].items() if k not in RECORD_KEYS})
    return record


RECORD_KEYS = {"side", "row", "dtype", "summary", "samples", "median", "first_loss", "round"}


def same_process(args, overrides):
    """The diagnostic mode: {(row, dtype): row record}, both sides' steps built in this process,
    every row's of a dtype warmed up, then timed in turn for --rounds rounds."""
    use_torch = not args.no_torch
    # torch, in this mode only and where it is timed: the colax processes of the default mode load none
    torch_step = importlib.import_module("torch_step") if use_torch else None
    table = {}
    for dtype in args.dtypes.split(","):
        sides = {}  # every row's steps of this dtype, timed in turn (ratios between rows interleaved too)
        for name in args.rows.split(","):
            cfg = colax_config(name, args.size, dtype, args.batch, args.seq_len, overrides)
            tokens = step_common.random_tokens(cfg.model.vocab_size, args.batch, args.seq_len)
            sides[name, "colax"], params = colax_step(cfg, tokens)
            if use_torch:
                sides[name, "torch"], _ = torch_step.training_step(
                    name, spec(cfg), tokens, torch_step.tensors(torch_tensors(name, params)), args.torch_attention)
        load_before = step_common.load_average()
        summaries = interleaved(sides, dtype, args.warmup, args.steps, args.rounds)
        load_after = step_common.load_average()
        for name in args.rows.split(","):
            table[name, dtype] = row_record(name, dtype, {side: summaries[name, side] for side in ("colax", "torch")
                                                          if (name, side) in summaries}, load_before, load_after)
    return table


def interleaved(sides, dtype, warmup, steps, rounds):
    """{(row, side): [a summary per round]} of `sides` {(row, side): step function} at `dtype`: each
    side's `warmup` untimed steps, then `rounds` rounds of `steps` timed steps of each side in turn;
    every timed step printed."""
    firsts = {k: step_common.timed_steps(run, warmup, 0, " ".join(k))[0] for k, run in sides.items()}
    out = {k: [] for k in sides}
    for r in range(rounds):
        for (name, side), run in sides.items():
            first, samples = step_common.timed_steps(run, 0, steps, f"{name} {side}")
            for i, (seconds, loss) in enumerate(samples):
                step_common.emit(dict(side=side, row=name, dtype=dtype, round=r, step=i, seconds=seconds, loss=loss))
            times = [seconds for seconds, _ in samples]
            out[name, side].append(dict(samples=times, median=statistics.median(times),
                                        first_loss=firsts[name, side] if firsts[name, side] is not None else first))
    return out


def fmt(x, spec):
    return format(x, spec) if x is not None else "n/a"


def print_table(table, tokens_per_step):
    """The table of `table`'s rows: s/step and tok/s per side, the ratios, the spreads, the load."""
    print(f"{'model':<8} {'dtype':<9} {'colax s':>8} {'torch s':>8} {'colax tok/s':>11} {'torch tok/s':>11} "
          f"{'colax/torch':>11} {'x full-rank':>11} {'spread c/t':>11} {'load before/after':>18}")
    out = []
    for (name, dtype), rec in table.items():
        colax, torch = rec["colax"], rec.get("torch")
        full = table.get(("llama", dtype))
        rec["colax_over_torch"] = torch["median"] / colax["median"] if torch else None
        rec["over_full_rank"] = full["colax"]["median"] / colax["median"] if full and name != "llama" else None
        torch_tps = torch and tokens_per_step / torch["median"]
        print(f"{name:<8} {dtype:<9} {colax['median']:>8.3f} {fmt(torch and torch['median'], '>8.3f')} "
              f"{tokens_per_step / colax['median']:>11.0f} {fmt(torch_tps, '>11.0f')} "
              f"{fmt(rec['colax_over_torch'], '>11.2f')} {fmt(rec['over_full_rank'], '>11.2f')} "
              f"{colax['spread']:>5.2f}/{fmt(torch and torch['spread'], '<5.2f')} "
              f"{rec['load_before'][0]:>8.2f}/{rec['load_after'][0]:<8.2f}", flush=True)
        out.append(rec)
    step_common.emit(dict(table=out))


def main(argv=None):
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    if args.spec:
        name, dtype = args.rows.split(",")[0], args.dtypes.split(",")[0]
        return print(json.dumps(spec(colax_config(name, args.size, dtype, args.batch, args.seq_len, overrides))))
    if args.child:
        return colax_child(args, overrides)
    if not HAS_TORCH and not args.no_torch:
        print("torch/transformers not installed (pip install -e '.[parity]'): timing colax only")
        args.no_torch = True
    kept = host.reuse_freed_memory() if args.same_process else None  # before this process's first step
    torch_version = "" if args.no_torch else importlib.metadata.version("torch")
    load = step_common.load_average()
    mode = (f"same process, malloc: {'colax.host' if kept else 'system'}" if args.same_process else
            f"separate processes (colax's malloc: train.py's setting; torch's: {args.torch_malloc})")
    print(f"{step_common.cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}"
          + (f", torch {torch_version} ({args.torch_threads} threads, attention {args.torch_attention or 'default'}"
             f"{', authors: ' + args.cola_repo if args.cola_repo else ''})" if not args.no_torch else "")
          + f"; {args.size}, {args.batch} x {args.seq_len} tokens, median of {args.steps} x {args.rounds} steps "
          f"after {args.warmup}; {mode}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    table = (same_process if args.same_process else separate)(args, overrides)
    print_table(table, args.batch * args.seq_len)
    load = step_common.load_average()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
