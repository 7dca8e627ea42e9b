"""PyTorch's training step of a benchmark row, in a process of its own, as its users run it.

    python benchmarks/torch_step.py --row llama --dtype bfloat16 [--size 60m] [--batch 8] [--seq_len 256]
        [--warmup 2] [--steps 5] [--threads N] [--attention sdpa|eager] [--malloc system|colax]
        [--cola_repo PATH] [--weights FILE.npz] [--spec JSON] [--config.a.b=v ...]

The model of row `--row` at colax's preset sizes and recipe (`cpu_step.colax_config`; without
--spec a short child process `benchmarks/cpu_step.py --spec` reads them, since colax.config imports
jax and this process does not):

- llama: `transformers.LlamaForCausalLM`, untied, with transformers' default attention (sdpa) unless
  --attention says otherwise;
- cola: with --cola_repo (a clone of alvin-zyl/CoLA), the authors' `ColaForCausalLM` built as their
  main.py builds it (`ColaForCausalLM(ColaConfig(...))`, CoLA@91ff0d1:main.py:353-354, then
  `.to(bfloat16)` for bf16, :362-363), with the attention transformers gives it (sdpa: their
  ColaSdpaAttention); without, the authors' forward as transcribed in tests/official/cola.py with
  the same sdpa kernel (`official_cola.causal_attention`);
- cola_m: `ColaMForCausalLM` from --cola_repo likewise (:356-357), or that forward cut into the
  authors' CoLA-M checkpoint segments (`cola_m_forward`).

Weights: --weights (an .npz of the authors' / Hugging Face state dict names, as
`colax.convert.to_tensors` writes them: cpu_step.py passes colax's initial weights), else the
model's own random init (transformers'; the transcription draws ColaLayer's). The authors' CoLA-M
takes its own init (its module names are its own); their CoLA loads the weights, and then starts from
colax's first loss. Uniform random tokens (seed 0), the summed-then-averaged token cross-entropy,
global-norm clipping at the preset's grad_clip, torch.optim.AdamW at its lr, betas, eps and weight
decay. `torch.set_num_threads(--threads)` (default: the cores); glibc's malloc is left as it is
unless --malloc colax (colax.host's setting, a diagnostic). jax is never imported.

Prints step_common's JSON lines: every timed step, then the summary (median, first loss, threads,
torch and transformers versions, the attention kernel, the malloc setting).
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import step_common

ROOT = Path(__file__).resolve().parents[1]
# transformers looks for the Hugging Face `kernels` package by importing `kernels` when it loads a
# model's module: with benchmarks/ on sys.path that is benchmarks/kernels.py, which imports jax. The
# folder leaves sys.path once step_common is in.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from colax import host  # noqa: E402

ROWS = ("llama", "cola", "cola_m")
sys.path.insert(0, str(ROOT / "tests"))
from official import cola as official_cola  # noqa: E402 (the authors' CoLA forward, transcribed; torch is passed in)


def spec_of(row, size, dtype, overrides):
    """The row's model sizes and recipe (`cpu_step.spec`), read from a child process that imports colax."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_step.py"), "--spec", "--rows", row, "--dtypes", dtype,
           "--size", size, *overrides]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def llama_model(spec, attention):
    """transformers' LlamaForCausalLM at `spec`'s sizes (untied, one key/value head per head);
    `attention` None: transformers' default kernel."""
    kwargs = {} if attention is None else dict(attn_implementation=attention)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"], rms_norm_eps=spec["norm_eps"], rope_theta=spec["rope_theta"],
        tie_word_embeddings=False, **kwargs))


def authors_model(repo, row, spec, attention):
    """The authors' ColaForCausalLM / ColaMForCausalLM from their clone `repo`, built as their main.py
    does (CoLA@91ff0d1:main.py:353-357) from a ColaConfig of `spec`'s sizes; use_cache as their
    configs set it (cola_configs/cola_60m.json:16 true, colam_60m.json:16 false)."""
    sys.path.insert(0, str(Path(repo).resolve()))
    try:
        cola = importlib.import_module("cola")
    except ImportError as e:
        raise SystemExit(f"--cola_repo {repo}: the authors' package does not import with transformers "
                         f"{transformers.__version__} ({e}); their code needs the transformers of late 2024 (4.47)")
    kwargs = {} if attention is None else dict(attn_implementation=attention)
    config = cola.ColaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"], rms_norm_eps=spec["norm_eps"],
        rope_theta=spec["rope_theta"], rank=spec["rank"], only_lr_act=spec["only_lr_act"], use_cache=row == "cola",
        **kwargs)
    return (cola.ColaForCausalLM if row == "cola" else cola.ColaMForCausalLM)(config)


def random_cola_tensors(spec, seed=0):
    """The authors' CoLA state dict at `spec`'s sizes, drawn as their init draws it: ColaLayer's factors
    (`official_cola.init_factors`), normal(0.02) embedding and lm_head (initializer_range,
    CoLA@91ff0d1:cola/modeling_cola.py:810-818), unit norms. float32 {name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    d, f, v, r = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"], spec["rank"]
    w = {"model.embed_tokens.weight": torch.randn(v, d, generator=g) * 0.02,
         "model.norm.weight": torch.ones(d), "lm_head.weight": torch.randn(v, d, generator=g) * 0.02}
    shapes = {**{key: (d, d) for key in official_cola.ATTN.values()},
              official_cola.MLP["gate"]: (d, f), official_cola.MLP["up"]: (d, f), official_cola.MLP["down"]: (f, d)}
    for i in range(spec["num_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"], w[f"{p}.post_attention_layernorm.weight"] = torch.ones(d), torch.ones(d)
        for key, (n_in, n_out) in shapes.items():
            w[f"{p}.{key}.cola_a"], w[f"{p}.{key}.cola_b"] = official_cola.init_factors(torch, n_in, n_out, r, g)
    return w


def model(row, spec, tensors=None, attention=None, cola_repo=None):
    """(forward: int64 [B, T] -> logits [B, T, V], parameters, the attention kernel's name) of row
    `row` in `spec`'s dtype, from float32 `tensors` (the authors' / HF names) or the model's own init
    (the authors' CoLA-M, --cola_repo, always its own)."""
    dtype = getattr(torch, spec["dtype"])
    if row == "llama" or cola_repo:
        net = llama_model(spec, attention) if row == "llama" else authors_model(cola_repo, row, spec, attention)
        if tensors is not None and row != "cola_m":  # CoLA-M's module names are its own: it keeps its init
            net.load_state_dict(tensors, strict=row == "cola")  # llama: the rotary inv_freq buffer is no weight
        net = net.to(dtype)
        return lambda tokens: net(input_ids=tokens).logits, list(net.parameters()), net.config._attn_implementation
    w = {k: t.to(dtype).requires_grad_() for k, t in (tensors or random_cola_tensors(spec)).items()}
    kernel = attention or "sdpa"
    fwd = official_cola.forward if row == "cola" else cola_m_forward
    return (lambda tokens: fwd(torch, w, tokens, spec["num_layers"], spec["num_heads"], spec["only_lr_act"],
                               eps=spec["norm_eps"], theta=spec["rope_theta"], kernel=kernel)), list(w.values()), kernel


def cola_m_forward(torch, w, tokens, num_layers, num_heads, only_lr_act, eps, theta, kernel="sdpa"):
    """CoLA-M as the authors run it (CoLA@91ff0d1:cola/modeling_colam.py:911-1004): each block in
    torch.utils.checkpoint segments cut at the r-wide silu(x @ A) of its projections, so the backward
    keeps those, the block input and the residual; the same logits as `official_cola.forward`.
    kernel: the attention's (ColaMSelfSdpaAttention by default, :578-696, :836-840)."""
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
            return down(official_cola.causal_attention(torch, q, k, v, num_heads, theta, kernel), p, attn["o"])

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


def training_step(row, spec, tokens, tensors=None, attention=None, cola_repo=None):
    """(a function running one PyTorch training step of row `row` to completion and returning its loss,
    the attention kernel's name): `model`'s forward on int32 `tokens` [B, T + 1], the mean token
    cross-entropy in float32, clipping, AdamW at `spec`'s recipe."""
    forward, parameters, kernel = model(row, spec, tensors, attention, cola_repo)
    opt = torch.optim.AdamW(parameters, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
                            weight_decay=spec["weight_decay"])
    inputs, targets = (torch.from_numpy(t.astype(np.int64)) for t in (tokens[:, :-1], tokens[:, 1:]))

    def run():
        loss = torch.nn.functional.cross_entropy(forward(inputs).float().flatten(0, 1), targets.flatten())
        loss.backward()
        if spec["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(parameters, spec["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run, kernel


def tensors(arrays):
    """{name: float32 tensor} of a state dict of arrays {name: array}."""
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in arrays.items()}


def load_weights(path):
    """{name: float32 tensor} of an .npz state dict."""
    with np.load(path) as f:
        return tensors({k: f[k] for k in f.files})


def set_malloc(setting):
    """Applies glibc's malloc `setting` ("system": untouched; "colax": colax.host's, a diagnostic);
    returns what the summary reports."""
    if setting == "system":
        return "system"
    return "colax.host" if host.reuse_freed_memory() else "system (colax.host declined)"


def model_name(row, cola_repo):
    """Whose model row `row` times: transformers', the authors' (--cola_repo) or the transcription."""
    return "transformers" if row == "llama" else "authors" if cola_repo else "transcription"


def parse(argv):
    """(args, ["--config.a.b=v" ...]) of the command line."""
    p = argparse.ArgumentParser(prog="python benchmarks/torch_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--row", required=True, choices=ROWS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--size", default="60m", help="colax's preset size (config.SIZES)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--attention", choices=step_common.ATTENTION, help="the attention kernel (default: the model's, sdpa)")
    p.add_argument("--malloc", default="system", choices=["system", "colax"],
                   help="glibc malloc: untouched, or colax.host's")
    p.add_argument("--cola_repo", help="a clone of alvin-zyl/CoLA: time the authors' own model classes")
    p.add_argument("--weights", help=".npz of initial weights (the authors' / HF names), else random init")
    p.add_argument("--spec", help="the JSON of cpu_step.spec (else read from colax's preset)")
    args, rest = p.parse_known_args(argv)
    if any(not item.startswith("--config.") for item in rest):
        p.error(f"unrecognized arguments {' '.join(rest)}")
    if args.weights and args.cola_repo and args.row == "cola_m":
        p.error("--weights: the authors' CoLA-M (--cola_repo) takes its own init")
    return args, rest


def main(argv=None):
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    malloc = set_malloc(args.malloc)  # first thing: before torch's threads start
    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec) if args.spec else spec_of(args.row, args.size, args.dtype, overrides)
    tokens = step_common.random_tokens(spec["vocab_size"], args.batch, args.seq_len)
    tensors = load_weights(args.weights) if args.weights else None
    run, kernel = training_step(args.row, spec, tokens, tensors, args.attention, args.cola_repo)
    keys = dict(side="torch", row=args.row, dtype=args.dtype)
    settings = dict(threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                    attention=kernel, malloc=malloc, model=model_name(args.row, args.cola_repo),
                    weights="given" if tensors is not None else "random init")
    return step_common.report(run, args.warmup, args.steps, keys, settings)


if __name__ == "__main__":
    main()
