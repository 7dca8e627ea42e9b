"""Full-rank LLaMA, SLTrain, CR-Net, CoLA, CoLA-M, GaLore, Fira, LoRA, ReLoRA, SwitchLoRA and SST side by side:
same data, same tokens, same seed.

    python benchmarks/compare.py [--size tiny] [--steps 300] [--runs llama,cola,...] [--out runs/compare]
        [--config.a.b=v ...]

Trains the models of one size (`--runs`, default all of `RUNS`) with `colax.loop.run` into
OUT/<name>. One tokenizer is trained into OUT (or `--tokenizer` is used) and `data.tokenizer`
points all runs at it, so with the same data seed they see identical batches. CoLA-M is CoLA with
`model.remat="cola_m"`: the same parameters and initialisation, only the backward pass differs.
GaLore and Fira are the full-rank model with those optimizers (`optim.name`). LoRA and ReLoRA
(`config.preset("lora" | "relora")`) train the full-rank model's frozen weights plus LoRA factors,
ReLoRA with its full-rank warm start, merges and jagged cosine; SwitchLoRA
(`config.preset("switchlora")`) LoRA with vector switches (its schedule follows `--steps`); SST
(`config.preset("sst")`) the full-rank model's sizes as sampled spectral factors (its iterations are the
jagged cosine's restarts, scaled with ReLoRA's; rounds of `model.sst_round_iterations` of them). Each model keeps its preset's
recipe (peak lr: CoLA's per size (also CR-Net's), full-rank `FULL_RANK_LR` (also LoRA/ReLoRA), SLTrain
`projections.sltrain.LR`, GaLore/Fira 0.01; warmup and ReLoRA's step counts scaled to `--steps` in the
preset's proportion) unless `--lr` (CoLA,
CoLA-M) / `--full_rank_lr` say otherwise; `--config.a.b=v` overrides are applied to all configs
last (`optim.*` of GaLore/Fira are ignored by AdamW runs). CR-Net's rank is its preset's
(`projections.crnet.RANK`: parameter-aligned with CoLA's count at 60M-350M, the paper's count at
1B; CoLA's rank at tiny, where block 1 alone exceeds CoLA's count); `--config.model.rank` sets both.

Writes OUT/compare.md (settings and table), OUT/compare.json (everything, with each run's
metrics.jsonl lines) and OUT/compare.png (loss curves). Columns: parameters; analytic training
FLOPs per token (`colax.model.flops_per_token`) and XLA's count of the compiled step, which
includes remat recomputation (`colax.plan`); steady-state tokens/s, the median of the
metrics.jsonl windows after the first one that were not evaluation steps; compiled temp +
argument bytes of one micro-batch step (`colax.plan`); the measured device peak
(`memory_stats()["peak_bytes_in_use"]`, "n/a" on CPU); final validation loss and perplexity.
Optimizer-state bytes are those of the optimizer's state for the model (`colax.plan`).
Ratio columns are against full-rank. The device peak is a process-wide high-water mark, so the
runs go in reverse table order, roughly ascending expected memory (Fira, GaLore, CoLA-M, CoLA, CR-Net, SLTrain,
full-rank; the kinds last in the table run first, SST, with full U and V per projection, and
SwitchLoRA, with its candidate pools, first of all); a run that does not raise it is
reported as "<=" the previous peak. The defaults are the CPU comparison of docs/compare.md.
"""

import argparse
import ast
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import matplotlib
from absl import logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from colax import config, loop, plan, tokenizer  # noqa: E402

# (name, label, preset kind, remat policy), in table order.
RUNS = (("llama", "full-rank", "llama", "none"), ("sltrain", "SLTrain", "sltrain", "none"),
        ("crnet", "CR-Net", "crnet", "none"), ("cola", "CoLA", "cola", "none"),
        ("cola_m", "CoLA-M", "cola", "cola_m"),
        ("galore", "GaLore", "galore", "none"), ("fira", "Fira", "fira", "none"),
        ("lora", "LoRA", "lora", "none"), ("relora", "ReLoRA", "relora", "none"),
        ("switchlora", "SwitchLoRA", "switchlora", "none"), ("sst", "SST", "sst", "none"))
# ReLoRA's step counts, scaled to --steps like the warmup (rounded up: one that is set stays >= 1).
RESTART_FIELDS = ("full_rank_steps", "restart_every", "restart_warmup_steps", "full_rank_warmup_steps")


def parse(argv):
    """(args, [(dotted key, value)]) from the command line; `--config.a.b=v` pairs come second."""
    p = argparse.ArgumentParser(prog="python benchmarks/compare.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=list(config.SIZES), help="preset size of all models")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS),
                   help="comma-separated run names, table order kept; the first is the ratio baseline")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=16, help="sequences per device per forward/backward")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=2048, help="model vocabulary = tokenizer pieces")
    p.add_argument("--data_source", default="stdlib", help="data.source: stdlib, text, jsonl, tfds, hf")
    p.add_argument("--data_path", default="", help="data.path for text/jsonl sources")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack documents into rows (--no-packing: the paper's one document per row)")
    p.add_argument("--tokenizer", default="", help="an existing .model file (default: train one into OUT)")
    p.add_argument("--lr", type=float, default=None, help="peak lr of CoLA and CoLA-M (default: the preset's)")
    p.add_argument("--full_rank_lr", type=float, default=None,
                   help=f"peak lr of full-rank (default: the preset's, {config.FULL_RANK_LR})")
    p.add_argument("--seed", type=int, default=0, help="train.seed (initialisation) and data.seed")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--eval_every", type=int, default=100, help="steps between validation passes (0: end only)")
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="restart runs already in OUT")
    args, rest = p.parse_known_args(argv)
    unknown = set(args.runs.split(",")) - {r[0] for r in RUNS}
    if unknown:
        p.error(f"--runs: unknown run {sorted(unknown)[0]!r} (known: {', '.join(r[0] for r in RUNS)})")
    pairs = []
    for arg in rest:
        key, sep, value = arg.removeprefix("--config.").partition("=")
        if not arg.startswith("--config.") or not sep:
            p.error(f"unrecognized argument {arg!r} (overrides are --config.a.b=value)")
        pairs.append((key, _literal(value)))
    return args, pairs


def _literal(text):
    """A Python literal (3, 0.1, True, 'x') or else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(cfg, key, value):
    """cfg[a][b] = value for key "a.b"; SystemExit with a one-line error for a bad key or type."""
    *path, last = key.split(".")
    section = cfg
    for name in path:
        section = section.get(name) if hasattr(section, "get") else None
    if not hasattr(section, "get") or last not in section:
        sys.exit(f"error: --config.{key}: no such config key")
    try:
        section[last] = value
    except TypeError as e:
        sys.exit(f"error: --config.{key}={value!r}: {e}")


def make_config(args, pairs, kind, remat, tok_path):
    """The config of one run: the preset of `kind` at `args.size` with the shared settings."""
    cfg = config.preset(kind, args.size)
    cfg.model.update(vocab_size=args.vocab_size, remat=remat)
    cfg.data.update(source=args.data_source, path=args.data_path, seq_len=args.seq_len, packing=args.packing,
                    seed=args.seed, tokenizer=tok_path, tokenizer_vocab_size=args.vocab_size,
                    tokenizer_sample_docs=300)
    lr = {"cola": args.lr, "llama": args.full_rank_lr}.get(kind)
    ratio = args.steps / cfg.train.steps
    cfg.optim.update(lr=lr or cfg.optim.lr, warmup_steps=round(cfg.optim.warmup_steps * ratio),
                     **{k: math.ceil(cfg.optim[k] * ratio) for k in RESTART_FIELDS})
    cfg.train.update(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                     seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                     eval_batches=args.eval_batches, baseline_batches=0, checkpoint_every=args.steps,
                     keep_checkpoints=1, sample_prompt="")
    for key, value in pairs:
        set_key(cfg, key, value)
    # The final figure covers the --eval_batches batches the periodic passes read (their tokens,
    # packed rows being full), so every run is measured on the same validation tokens.
    rows = cfg.train.batch_size // config.accum_steps(cfg)
    cfg.train.final_eval_tokens = max(cfg.train.eval_batches * rows * cfg.data.seq_len - 1, 0)
    return cfg


def shared_tokenizer(args, pairs, out):
    """The path of the one tokenizer all runs use: `--tokenizer`, else trained into `out` once."""
    cfg = make_config(args, pairs, "cola", "none", args.tokenizer)
    return tokenizer.get_or_train_tokenizer(cfg.data, out).path


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steady(lines, key):
    """Median of `key` over the metrics lines after the first timed window, without eval steps."""
    timed = [m for m in lines if m.get("tokens_per_s") is not None][1:]
    values = [m[key] for m in timed if "eval_loss" not in m and m.get(key) is not None]
    return statistics.median(values) if values else None


def device_peak():
    """Peak bytes in use on the first device so far (None where the backend does not say, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def run_one(name, label, cfg, out, overwrite, previous_peak):
    """Plans and trains one model; returns its row (dict)."""
    start = time.time()
    p = plan.plan(cfg)
    result = loop.run(cfg, os.path.join(out, name), overwrite=overwrite)
    lines = read_metrics(os.path.join(out, name))
    peak = device_peak()
    t = cfg.train
    return dict(
        name=name, label=label, projection=cfg.model.projection, remat=cfg.model.remat, lr=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps, optimizer=cfg.optim.name,
        optimizer_state_bytes=next(r["bytes"] for r in p["optimizer_state"] if r["current"]), params=p["params"], embedding_params=p["embedding_params"],
        non_embedding_params=p["params"] - p["embedding_params"],
        flops_per_token=p["flops_per_token"], xla_flops_per_token=p["xla_flops_per_token"],
        temp_bytes=p["memory"]["temp_bytes"], argument_bytes=p["memory"]["argument_bytes"],
        compiled_bytes=p["memory"]["temp_bytes"] + p["memory"]["argument_bytes"],
        measured_peak_bytes=peak, peak_upper_bound=bool(peak and previous_peak and peak <= previous_peak),
        tokens=t.steps * t.batch_size * cfg.data.seq_len, tokens_per_s=steady(lines, "tokens_per_s"),
        mfu=steady(lines, "mfu"), eval_loss=result["eval_loss"], eval_ppl=result["eval_ppl"],
        wall_s=time.time() - start, metrics=lines)


def _ratio(row, base, key):
    a, b = row[key], base[key]
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _peak(row):
    if row["measured_peak_bytes"] is None:
        return "n/a"
    return ("<= " if row["peak_upper_bound"] else "") + f"{row['measured_peak_bytes'] / 2**20:.1f}"


def markdown(rows):
    """The comparison table; ratios are against the first (full-rank) row."""
    base = rows[0]
    lines = ["| model | remat | peak lr | params (M) | x | non-emb. params (M) | x | GFLOPs/token analytic | x "
             "| GFLOPs/token XLA | x | tokens/s | x | MFU | compiled temp+args (MiB) | x | measured peak (MiB) "
             "| val loss | val ppl | x | optimizer | optimizer state (MiB) | x |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
             "|---|---:|---:|"]
    for r in rows:
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(
            f"| {r['label']} | {r['remat']} | {r['lr']:g} | {r['params'] / 1e6:.3f} | {_ratio(r, base, 'params')} "
            f"| {r['non_embedding_params'] / 1e6:.3f} | {_ratio(r, base, 'non_embedding_params')} "
            f"| {r['flops_per_token'] / 1e9:.4f} | {_ratio(r, base, 'flops_per_token')} "
            f"| {r['xla_flops_per_token'] / 1e9:.4f} | {_ratio(r, base, 'xla_flops_per_token')} "
            f"| {tps} | {_ratio(r, base, 'tokens_per_s')} | {mfu} "
            f"| {r['compiled_bytes'] / 2**20:.1f} | {_ratio(r, base, 'compiled_bytes')} | {_peak(r)} "
            f"| {r['eval_loss']:.4f} | {r['eval_ppl']:.2f} | {_ratio(r, base, 'eval_ppl')} "
            f"| {r['optimizer']} | {r['optimizer_state_bytes'] / 2**20:.2f} | {_ratio(r, base, 'optimizer_state_bytes')} |")
    return "\n".join(lines)


def plot(rows, title, path):
    """Training loss (lines) and validation loss (markers) against tokens seen, one colour per model."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for r, color in zip(rows, (f"C{i}" for i in range(len(rows)))):
        per_step = r["tokens"] / r["metrics"][-1]["step"] / 1e6
        ax.plot([m["step"] * per_step for m in r["metrics"]], [m["loss"] for m in r["metrics"]], color=color,
                lw=1.2, label=f"{r['label']} train (lr {r['lr']:g})")
        evals = [m for m in r["metrics"] if "eval_loss" in m]
        ax.plot([m["step"] * per_step for m in evals], [m["eval_loss"] for m in evals], "o--", color=color,
                ms=5, lw=0.8, label=f"{r['label']} validation (final ppl {r['eval_ppl']:.1f})")
    ax.set(title=title, xlabel="training tokens (millions)", ylabel="cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine():
    d = jax.devices()
    return dict(backend=jax.default_backend(), device_kind=d[0].device_kind, devices=len(d),
                cpu_count=os.cpu_count(), platform=platform.platform(), jax=jax.__version__)


def compare(args, pairs, command):
    """Trains the `--runs` and writes the report files; returns the report dict."""
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    tok_path = shared_tokenizer(args, pairs, args.out)
    runs = [run for run in RUNS if run[0] in args.runs.split(",")]
    cfgs = {name: make_config(args, pairs, kind, remat, tok_path) for name, _, kind, remat in runs}
    rows, peak = {}, None
    for name, label, _, _ in reversed(runs):  # ascending expected memory: see the module docstring
        rows[name] = run_one(name, label, cfgs[name], args.out, args.overwrite, peak)
        peak = rows[name]["measured_peak_bytes"] or peak
    rows = [rows[name] for name, *_ in runs]
    settings = {k: v for k, v in vars(args).items() if k != "overwrite"}
    report = dict(command=command, settings=settings,
                  overrides=dict(pairs), tokenizer=tok_path, machine=machine(), wall_s=time.time() - start,
                  table=markdown(rows), runs=rows)
    title = (f"{args.size}: {' vs '.join(r['label'] for r in rows)}, {rows[0]['tokens'] / 1e6:.2f}M tokens each, "
             f"seed {args.seed}")
    plot(rows, title, os.path.join(args.out, "compare.png"))
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(header(report) + "\n\n" + report["table"] + "\n")
    return report


def header(report):
    """Settings, machine and wall time above the table in compare.md."""
    s, m = report["settings"], report["machine"]
    runs = ", ".join(f"{r['label']} lr {r['lr']:g} (warmup {r['warmup_steps']})" for r in report["runs"])
    return "\n".join([
        f"# {' vs '.join(r['label'] for r in report['runs'])} ({s['size']})", "",
        f"- command: `{report['command']}`",
        f"- {s['steps']} steps x {s['batch_size']} sequences x {s['seq_len']} tokens = "
        f"{report['runs'][0]['tokens']:,} tokens per run, data `{s['data_source']}`, seed {s['seed']}, "
        f"tokenizer `{report['tokenizer']}` shared by all runs",
        f"- peak lr: {runs}; overrides: {report['overrides'] or 'none'}",
        f"- machine: {m['devices']} x {m['device_kind']} ({m['backend']}), {m['cpu_count']} CPU cores, "
        f"jax {m['jax']}; wall time {report['wall_s']:.0f} s",
    ])


def main(argv=None):
    """Parses `argv` (default: sys.argv[1:]), runs the comparison, prints the table; returns the report."""
    logging.set_verbosity(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    report = compare(*parse(argv), " ".join(["python benchmarks/compare.py", *argv]))
    print(header(report) + "\n\n" + report["table"])
    return report


if __name__ == "__main__":
    main()
