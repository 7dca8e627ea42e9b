"""`python -m colax.plan --config C [--remat a,b] [--json]`: sizes, FLOPs and memory before a run.

Everything is compiled from abstract shapes (`jax.eval_shape`), so a 7B plan runs on a laptop
without allocating weights. XLA's cost analysis counts a `scan` body once, so for a scanned model
one block's FLOPs are counted as flops(2 blocks per iteration) - flops(1 block per iteration) and
flops(L) = flops(model) + (S - n) * flops(block) for S scanned blocks run as n scans (1; CR-Net's
`crnet` policy: one per segment; its full-rank block 1 is never scanned), which is exact for
identical blocks; an unrolled model is counted as compiled.
`--remat a,b` adds one row per policy: temp memory, FLOPs and what one block saves for the backward.
"""

from colax import errors

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")

import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
# Public only through print_saved_residuals, which prints this list of (aval, description).
from jax._src.ad_checkpoint import saved_residuals as _saved_residuals  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from colax import config as config_lib  # noqa: E402
from colax import model as model_lib  # noqa: E402
from colax import optim, remat, step, xent  # noqa: E402
from colax.errors import ConfigError, exit_on_error, parse_flags  # noqa: E402
from colax.projections.common import projection_shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_REMAT = flags.DEFINE_string("remat", "", "Comma-separated remat policies to compare, one row each: " + "; ".join(
    f"{name}: {r.doc}" for name, r in remat.POLICIES.items()))
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def compile_step(spec, cfg, batch_size, seq_len):
    """Compiles one training step (one micro-batch [batch_size, seq_len]) from abstract shapes, with
    dropout's PRNG key where the model takes one (`model.uses_rng`)."""
    graphdef, state = nnx.split(model_lib.abstract_model(spec))
    params = nnx.to_pure_dict(state)
    tx = optim.make(cfg.optim, cfg.train.steps)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32)
    batch = dict(inputs=tokens, targets=tokens, loss_mask=jax.ShapeDtypeStruct(tokens.shape, jnp.float32))
    train_step = jax.jit(step.make_train_step(graphdef, tx), donate_argnums=(0, 1))
    key = (jax.eval_shape(lambda: jax.random.key(0)),) if model_lib.uses_rng(spec) else ()
    return train_step.lower(params, opt_state, batch, *key).compile()


def xla_flops(compiled):
    """FLOPs from XLA's cost analysis (a dict, or a one-element list on older jax)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def step_flops(spec, cfg, batch_size, seq_len, compiled=None):
    """XLA FLOPs of one training step as the model runs (`compiled`: its step, if at hand).

    XLA counts a loop body once. For a scanned model, one block's forward and backward are
    counted as the difference of copies with 4 scanned blocks and one and two blocks per scan
    iteration: the backward's recomputation stays in its own loop, as in training, where an
    unrolled copy would let XLA merge it with the forward. The loss's loop over sequence chunks
    (`colax.xent`) adds its uncounted chunks, each counted as one chunk's loss and gradients.
    """
    compiled = compiled or compile_step(spec, cfg, batch_size, seq_len)
    flops = xla_flops(compiled)
    if spec.scan_layers:
        unscanned = int(model_lib.is_cross_layer(spec))
        loops = len(remat.segment_ends(spec.num_layers)) if remat.POLICIES[spec.remat].inverts else 1
        copy = spec.replace(num_layers=4 + unscanned)
        per_unroll = [xla_flops(compile_step(copy.replace(scan_unroll=u), cfg, batch_size, seq_len)) for u in (1, 2)]
        flops += (spec.num_layers - unscanned - loops) * (per_unroll[1] - per_unroll[0])
    chunks = seq_len // xent.sequence_chunk(batch_size, seq_len)
    if chunks > 1:  # one chunk: nothing uncounted, nothing to compile
        flops += (chunks - 1) * loss_chunk_flops(spec, batch_size, seq_len)
    return flops


def loss_chunk_flops(spec, batch_size, seq_len):
    """XLA FLOPs of one sequence chunk of `xent.lm_head_loss` and its gradients."""
    chunk = xent.sequence_chunk(batch_size, seq_len)
    shape = lambda *s, dtype=spec.dtype: jax.ShapeDtypeStruct(s, dtype)
    args = (shape(batch_size, chunk, spec.hidden_size), shape(spec.hidden_size, spec.vocab_size),
            shape(batch_size, chunk, dtype=jnp.int32), shape(batch_size, chunk, dtype=jnp.float32))
    return xla_flops(jax.jit(jax.value_and_grad(xent.lm_head_loss, (0, 1))).lower(*args).compile())


def memory(compiled):
    """Argument, output, temp and alias bytes of a compiled step."""
    m = compiled.memory_analysis()
    return dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
                host_temp_bytes=int(m.host_temp_size_in_bytes))


def plan(cfg, remats=()):
    """The plan of config `cfg` as a dict; `remats` adds one row per named remat policy."""
    spec = config_lib.validate(cfg)
    batch_size, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    counts = model_lib.count_params(spec)
    analytic = model_lib.flops_per_token(spec, seq_len)
    tokens = batch_size * seq_len
    compiled = compile_step(spec, cfg, batch_size, seq_len)
    result = dict(
        params=counts["total"], lowrank_params=counts["lowrank"], embedding_params=counts["embeddings"],
        trainable_params=counts["trainable"], state_bytes=counts["state"] * jnp.dtype(spec.param_dtype).itemsize,
        warm_start_trainable_params=counts["trainable_full_rank"] if cfg.optim.full_rank_steps else None,
        tokens_per_step=tokens, flops_per_token=analytic["train"], forward_flops_per_token=analytic["forward"],
        xla_flops_per_step=step_flops(spec, cfg, batch_size, seq_len, compiled), memory=memory(compiled))
    result["xla_flops_per_token"] = result["xla_flops_per_step"] / tokens
    result["optimizer_state"] = optimizer_state(spec, cfg)
    result["remat"] = [remat_row(cfg, name) for name in remats]
    return result


def optimizer_state(spec, cfg):
    """Optimizer-state bytes of the model under every optimizer (`optim.NAMES`, the config's other
    `optim` settings): [{"name", "bytes", "vs_adamw"}, or {"name", "error"} where a setting does not
    fit the model], from abstract shapes; "current" marks the config's own optimizer."""
    params = nnx.to_pure_dict(nnx.state(model_lib.abstract_model(spec)))
    rows = []
    for name in optim.NAMES:
        o = cfg.optim.copy_and_resolve_references()
        o.name = name
        try:
            optim.check_model(o, spec)
        except ConfigError as e:
            rows.append(dict(name=name, error=str(e), current=name == cfg.optim.name))
            continue
        state = jax.eval_shape(optim.make(o, cfg.train.steps).init, params)
        rows.append(dict(name=name, bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
                         current=name == cfg.optim.name))
    for row in rows:
        if "bytes" in row:
            row["vs_adamw"] = row["bytes"] / rows[0]["bytes"]
    return rows


def remat_row(cfg, name):
    """Temp memory, FLOPs and the per-block saved values of the step under remat policy `name`.

    An offloading policy that leaves host memory unused (the CPU backend) gets a "note" saying so.
    """
    m = cfg.model.copy_and_resolve_references()
    m.remat = name
    spec = model_lib.spec_from_config(m)  # ConfigError for a CoLA-M policy on a full-rank model
    batch_size, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    compiled = compile_step(spec, cfg, batch_size, seq_len)
    mem = memory(compiled)
    saved = saved_per_block(spec, batch_size, seq_len)
    count, formula = per_token(spec, saved, batch_size, seq_len)
    row = dict(remat=name, temp_bytes=mem["temp_bytes"], host_temp_bytes=mem["host_temp_bytes"],
               xla_flops_per_step=step_flops(spec, cfg, batch_size, seq_len, compiled),
               saved_per_block=saved, saved_values_per_token=count, saved_values_formula=formula)
    if remat.POLICIES[name].offload and not mem["host_temp_bytes"]:
        row["note"] = f"nothing offloaded on {jax.default_backend()}: the saved values stay in temp memory"
    return row


def _source(description):
    """`saved_residuals`' description -> "argument <name>", the tag, or "<primitive>"."""
    if description.startswith("from the argument"):
        return "argument " + re.sub(r"\W.*", "", description.removeprefix("from the argument "))
    if description.startswith("named '"):
        return description.split("'")[1]
    return description.split(" from ")[0]


def saved_per_block(spec, batch_size, seq_len):
    """What one block keeps for its backward under spec.remat: [{shape, dtype, source, blocks}].

    From `saved_residuals` of the block's VJP, called as f(x, carry, positions, params) (carry: the
    previous block's outputs for a cross-layer kind, else {}); the parameters and positions
    (shared by all blocks) are left out; source is "argument x", "argument carry", a tag like
    "cola_z", or the producing primitive. Under an inverting policy (`crnet`) it is measured on
    one segment of `remat.EVERY` blocks: a value kept once per segment has blocks = EVERY.
    """
    graphdef, stacked = nnx.split(model_lib.abstract_model(spec).blocks)
    inverts = remat.POLICIES[spec.remat].inverts
    n = remat.EVERY if inverts else 1
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]) if inverts else a.shape[1:], a.dtype),
                          stacked)
    x = jax.ShapeDtypeStruct((batch_size, seq_len, spec.hidden_size), spec.dtype)
    positions = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    carry = {}
    if model_lib.is_cross_layer(spec):
        shapes = projection_shapes(spec.hidden_size, spec.intermediate_size)
        carry = {name: jax.ShapeDtypeStruct((batch_size, seq_len, out), spec.dtype) for name, (_, out) in shapes.items()}
    if inverts:
        block = lambda x, carry, positions, params: model_lib.inverted_blocks(
            graphdef, (x, carry), params, (positions, None), [n])
    else:
        block = remat.checkpointed(
            lambda x, carry, positions, params: nnx.merge(graphdef, params)(x, positions, None, carry), spec.remat)
    saved = []
    for aval, description in _saved_residuals(block, x, carry, positions, params):
        per_block = inverts and aval.shape[:1] == (n,)
        saved.append(dict(shape=list(aval.shape[1:] if per_block else aval.shape), dtype=str(aval.dtype),
                          source=_source(description), blocks=1 if per_block or not inverts else n))
    return [row for row in saved if row["source"] not in ("argument params", "argument positions")]


def per_token(spec, saved, batch_size, seq_len):
    """Saved values per token and block: (count, formula), e.g. (7680, "2d+7r") with d hidden, r rank,
    f mlp; widths that are none of these are summed into one number; values kept once per n blocks
    (row["blocks"] = n) are added as "+(...)/n"."""
    symbols = {spec.hidden_size: "d", spec.intermediate_size: "f", **{r: "r" for _, r in spec.ranks if r}}

    def formula(rows):
        widths = [math.prod(row["shape"]) // (batch_size * seq_len) for row in rows]
        counts = collections.Counter(symbols[w] for w in widths if w in symbols)
        terms = [f"{n if n > 1 else ''}{s}" for s, n in counts.items()]
        other = sum(w for w in widths if w not in symbols)
        return sum(widths), "+".join(terms + ([str(other)] if other else [])) or "0"

    count, text = formula([row for row in saved if row.get("blocks", 1) == 1])
    shared = [row for row in saved if row.get("blocks", 1) > 1]
    if not shared:
        return count, text
    n = shared[0]["blocks"]
    shared_count, shared_text = formula(shared)
    return count + shared_count / n, f"{text}+({shared_text})/{n}"


def _gib(n):
    return f"{n / 2**30:8.2f} GiB"


def format_text(p):
    lines = [
        f"parameters        {p['params'] / 1e6:10.2f} M  (low-rank {p['lowrank_params'] / 1e6:.2f} M, "
        f"embeddings {p['embedding_params'] / 1e6:.2f} M)",
        f"trained           {p['trainable_params'] / 1e6:10.2f} M  by the optimizer (the rest frozen)"
        + (f"; {p['warm_start_trainable_params'] / 1e6:.2f} M in the full-rank warm start"
           if p["warm_start_trainable_params"] else ""),
    ] + ([f"model state       {_gib(p['state_bytes'])}  beside the parameters (SwitchLoRA's candidate pools)"]
         if p["state_bytes"] else []) + [
        f"FLOPs per token   {p['flops_per_token'] / 1e9:10.3f} G  training step, analytic "
        f"(forward {p['forward_flops_per_token'] / 1e9:.3f} G)",
        f"XLA FLOPs/token   {p['xla_flops_per_token'] / 1e9:10.3f} G  "
        f"({p['xla_flops_per_token'] / p['flops_per_token']:.3f}x analytic)",
        f"step              {p['tokens_per_step']:10d} tokens per device per micro-batch",
        "memory            " + ", ".join(f"{k.replace('_bytes', '')} {_gib(v).strip()}"
                                          for k, v in p["memory"].items()),
    ]
    lines.append("optimizer state   " + ", ".join(
        f"{r['name']}{' (this config)' if r['current'] else ''} "
        + (f"{_gib(r['bytes']).strip()} ({r['vs_adamw']:.2f}x adamw)" if "bytes" in r else f"n/a: {r['error']}")
        for r in p["optimizer_state"]))
    return "\n".join(lines + [_remat_line(row, p["tokens_per_step"]) for row in p["remat"]])


def _remat_line(row, tokens):
    host = f" (+{_gib(row['host_temp_bytes']).strip()} host)" if row["host_temp_bytes"] else ""
    return (f"remat {row['remat']:<14s} temp {_gib(row['temp_bytes'])}{host}  "
            f"FLOPs/token {row['xla_flops_per_step'] / tokens / 1e9:7.3f} G  "
            f"saved per block and token {row['saved_values_formula']} = {row['saved_values_per_token']}"
            + (f"  ({row['note']})" if "note" in row else ""))


@exit_on_error
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/cola_1b.py")
    remats = [r for r in _REMAT.value.split(",") if r]
    unknown = [r for r in remats if r not in remat.POLICIES]
    if unknown:
        raise app.UsageError(f"--remat: unknown policy {unknown[0]!r} (known: {', '.join(remat.POLICIES)})")
    p = plan(cfg, remats)
    print(json.dumps(p) if _JSON.value else format_text(p))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
