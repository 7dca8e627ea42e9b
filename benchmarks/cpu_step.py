"""colax's training step against PyTorch's on the CPU: forward + backward + AdamW, tokens/s side by side.

    python benchmarks/cpu_step.py [--size 60m] [--batch 8] [--seq_len 256] [--warmup 2] [--steps 5]
        [--rounds 2] [--rows cola,llama,cola_m] [--dtypes float32,bfloat16] [--threads 2]
        [--config.a.b=v ...]

Per row (model x dtype) colax's step is the jitted step `train.py` runs (`colax.trainer.Trainer` on
the state of `colax.state.init_state`, built from the preset `config.preset(kind, size)` with the
batch set to one micro-batch of --batch x --seq_len); PyTorch's is the same model at the same sizes:

- llama: `transformers.LlamaForCausalLM` (its default attention), untied, same vocab, RoPE theta, eps;
- cola: the authors' CoLA forward as transcribed in tests/official/cola.py (silu(x @ A) @ B in all
  seven projections, eager attention);
- cola_m: that forward split into the authors' CoLA-M checkpoint segments (torch.utils.checkpoint,
  CoLA@91ff0d1:cola/modeling_colam.py:911-1004): it keeps the block input, the residual and the
  r-wide silu(x @ A) of every projection; colax's `model.remat=cola_m` keeps x @ A instead.

Both take uniform random tokens, the summed-then-averaged token cross-entropy, global-norm clipping at
the preset's `optim.grad_clip` and AdamW at the preset's lr, betas, eps and weight decay. float32:
parameters and compute in fp32; bfloat16: pure bf16 (colax param_dtype and dtype bfloat16, torch
`model.to(bfloat16)`), the paper's mode. Per dtype every row's two steps are compiled/warmed up
(--warmup steps, not timed), then timed in turn, colax and torch of each row (--steps steps of each
per round, --rounds rounds); tok/s is batch x seq_len over the median step time. Ratios: colax /
torch per row, and CoLA (and CoLA-M) / full-rank within colax at the same dtype, both from steps
timed in the same rounds. glibc's malloc is set as train.py sets it (`colax.host`, for both sides:
they share the process; COLAX_MALLOC=system leaves it). Needs torch and transformers (the
`parity` extra); without them only colax's column is printed. Nothing here is asserted: CPU timing
is in no test (docs/cpu_performance.md has the measured tables).
"""

import argparse
import ast
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from colax import config, convert, host, loop, sharding, state, trainer
from colax import model as model_lib

ROWS = {"llama": ("llama", "none"), "cola": ("cola", "none"), "cola_m": ("cola", "cola_m")}  # kind, remat
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from official import cola as official_cola  # noqa: E402 (the authors' CoLA forward, transcribed; torch is passed in)


def parse(argv):
    """(args, [(dotted key, value)]): `--config.a.b=v` pairs are applied to every colax config last."""
    p = argparse.ArgumentParser(prog="python benchmarks/cpu_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="60m", choices=list(config.SIZES))
    p.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side per row (after compiling)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each side per round")
    p.add_argument("--rounds", type=int, default=2, help="A B A B rounds per row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of float32, bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--no_torch", action="store_true", help="time colax only")
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


def random_tokens(vocab, batch, seq_len, seed=0):
    """Uniform random int32 [batch, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)


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


def torch_forward(torch, name, m, tensors):
    """(forward: int64 [B, T] -> logits [B, T, V], parameters) of row `name` in torch, with colax's
    initial weights `tensors` (`convert.to_tensors`, the authors' / Hugging Face names)."""
    if name == "llama":
        import transformers

        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
            rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False))
        hf.load_state_dict(tensors, strict=False)  # the rotary inv_freq buffer is not a weight
        return lambda tokens: hf(input_ids=tokens).logits, list(hf.parameters())
    forward = official_cola.forward if name == "cola" else cola_m_forward
    return (lambda tokens: forward(torch, tensors, tokens, m.num_layers, m.num_heads, m.only_lr_act,
                                   eps=m.norm_eps, theta=m.rope_theta)), list(tensors.values())


def cola_m_forward(torch, w, tokens, num_layers, num_heads, only_lr_act, eps, theta):
    """CoLA-M as the authors run it (CoLA@91ff0d1:cola/modeling_colam.py:911-1004): each block in
    torch.utils.checkpoint segments cut at the r-wide silu(x @ A) of its projections, so the backward
    keeps those, the block input and the residual; the same logits as `official_cola.forward`."""
    from torch.utils.checkpoint import checkpoint

    down = lambda h, p, key: official_cola.cola_down(torch, h, w, f"{p}.{key}")
    up = lambda h, p, key: official_cola.cola_up(torch, h, w, f"{p}.{key}")
    attn, mlp = official_cola.ATTN, official_cola.MLP
    segment = lambda fn, *args: checkpoint(fn, *args, preserve_rng_state=False, use_reentrant=True)
    x, hd = w["model.embed_tokens.weight"][tokens], None
    for i in range(num_layers):
        p = f"model.layers.{i}"

        def pre_attn(hd, residual, p=p, last=f"model.layers.{i - 1}"):  # :911-944
            x = residual if hd is None else up(hd, last, mlp["down"]) + residual
            h = official_cola.rms_norm(torch, x, w[f"{p}.input_layernorm.weight"], eps)
            return (*(down(h, p, attn[k]) for k in "qkv"), x)

        def self_attn(hq, hk, hv, p=p):  # :947-962 with the o projection's A (CoLAMSelfAttn)
            q, k, v = up(hq, p, attn["q"]), up(hk, p, attn["k"]), up(hv, p, attn["v"])
            return down(official_cola.causal_attention(torch, q, k, v, num_heads, theta), p, attn["o"])

        def pre_mlp(ho, residual, p=p):  # :966-980
            x = up(ho, p, attn["o"]) + residual
            h = official_cola.rms_norm(torch, x, w[f"{p}.post_attention_layernorm.weight"], eps)
            return down(h, p, mlp["gate"]), down(h, p, mlp["up"]), x

        def self_mlp(hg, hu, p=p):  # :983-988 (CoLAMSelfMLP)
            gate, val = up(hg, p, mlp["gate"]), up(hu, p, mlp["up"])
            gate = gate if only_lr_act else torch.nn.functional.silu(gate)
            return down(gate * val, p, mlp["down"])

        hq, hk, hv, x = segment(pre_attn, hd, x)
        hg, hu, x = segment(pre_mlp, segment(self_attn, hq, hk, hv), x)
        hd = segment(self_mlp, hg, hu)
    x = segment(lambda hd, residual: up(hd, f"model.layers.{num_layers - 1}", mlp["down"]) + residual, hd, x)  # :990-1004
    x = official_cola.rms_norm(torch, x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def torch_step(name, cfg, tokens, params):
    """A function running one PyTorch training step of row `name` at `cfg`'s sizes and recipe,
    starting from colax's initial `params`."""
    import torch

    m, o = cfg.model, cfg.optim
    dtype = getattr(torch, m.dtype)
    tensors = {k: torch.from_numpy(np.array(v, np.float32)).to(dtype).requires_grad_()
               for k, v in convert.to_tensors(params, "llama" if name == "llama" else "cola").items()}
    forward, parameters = torch_forward(torch, name, m, tensors)
    opt = torch.optim.AdamW(parameters, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    inputs, targets = (torch.from_numpy(t.astype(np.int64)) for t in (tokens[:, :-1], tokens[:, 1:]))

    def run():
        loss = torch.nn.functional.cross_entropy(forward(inputs).float().flatten(0, 1), targets.flatten())
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def interleaved(sides, warmup, steps, rounds):
    """{side: median seconds per step}: each side's `warmup` untimed steps, then `rounds` rounds of
    `steps` timed steps of each side in turn."""
    for run in sides.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in sides}
    for _ in range(rounds):
        for k, run in sides.items():
            for _ in range(steps):
                start = time.perf_counter()
                loss = run()
                times[k].append(time.perf_counter() - start)
                if not math.isfinite(loss):
                    raise SystemExit(f"{' '.join(k) if isinstance(k, tuple) else k}: non-finite loss {loss}")
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), or the machine type where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def fmt(x, spec):
    return format(x, spec) if x is not None else "n/a"


def main(argv=None):
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    kept = host.reuse_freed_memory()  # before the first step starts JAX's threads; torch shares the process
    use_torch = HAS_TORCH and not args.no_torch
    if not HAS_TORCH and not args.no_torch:
        print("torch/transformers not installed (pip install -e '.[parity]'): timing colax only")
    if use_torch:
        import torch

        torch.set_num_threads(args.threads)
    tokens_per_step = args.batch * args.seq_len
    load = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}"
          + (f", torch {torch.__version__} ({args.threads} threads)" if use_torch else "")
          + f"; {args.size}, {args.batch} x {args.seq_len} tokens, median of {args.steps} x {args.rounds} steps "
          f"after {args.warmup}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; malloc: {'colax.host' if kept else 'system'}", flush=True)
    print(f"{'model':<8} {'dtype':<9} {'colax tok/s':>11} {'torch tok/s':>11} {'colax/torch':>11} "
          f"{'x full-rank':>11}", flush=True)
    rows = args.rows.split(",")
    for dtype in args.dtypes.split(","):
        sides = {}  # every row's steps of this dtype, timed in turn (ratios between rows interleaved too)
        for name in rows:
            cfg = colax_config(name, args.size, dtype, args.batch, args.seq_len, overrides)
            tokens = random_tokens(cfg.model.vocab_size, args.batch, args.seq_len)
            sides[name, "colax"], params = colax_step(cfg, tokens)
            if use_torch:
                sides[name, "torch"] = torch_step(name, cfg, tokens, params)
        tps = {k: tokens_per_step / s for k, s in interleaved(sides, args.warmup, args.steps, args.rounds).items()}
        for name in rows:
            ratio = tps[name, "colax"] / tps[name, "torch"] if use_torch else None
            vs_full = tps[name, "colax"] / tps["llama", "colax"] if "llama" in rows and name != "llama" else None
            print(f"{name:<8} {dtype:<9} {tps[name, 'colax']:>11.0f} {fmt(tps.get((name, 'torch')), '>11.0f')} "
                  f"{fmt(ratio, '>11.2f')} {fmt(vs_full, '>11.2f')}", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
