"""`python -m colax.plan --config C [--remat a,b] [--json]`: sizes, FLOPs and memory before a run.

Everything is compiled from abstract shapes (`jax.eval_shape`), so a 7B plan runs on a laptop
without allocating weights. XLA's cost analysis counts a `scan` body once, so the step's FLOPs are
counted on unrolled 1- and 2-layer copies of the model and extrapolated to L layers:
flops(L) = flops(1) + (L - 1) * (flops(2) - flops(1)), which is exact for identical blocks.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from colax import config as config_lib
from colax import model as model_lib
from colax import optim, remat, step
from colax.errors import exit_on_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_REMAT = flags.DEFINE_string("remat", "", "Comma-separated remat policies to compare (default: the config's).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def compile_step(spec, cfg, batch_size, seq_len):
    """Compiles one training step (one micro-batch [batch_size, seq_len]) from abstract shapes."""
    graphdef, state = nnx.split(model_lib.abstract_model(spec))
    params = state.to_pure_dict()
    tx = optim.make(cfg.optim, cfg.train.steps)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32)
    batch = dict(inputs=tokens, targets=tokens, loss_mask=jax.ShapeDtypeStruct(tokens.shape, jnp.float32))
    train_step = jax.jit(step.make_train_step(graphdef, tx), donate_argnums=(0, 1))
    return train_step.lower(params, opt_state, batch).compile()


def xla_flops(compiled):
    """FLOPs from XLA's cost analysis (a dict, or a one-element list on older jax)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def unrolled_flops(spec, cfg, batch_size, seq_len, num_layers):
    """XLA FLOPs of the step with `num_layers` unrolled blocks."""
    return xla_flops(compile_step(spec.replace(num_layers=num_layers, scan_layers=False), cfg,
                                  batch_size, seq_len))


def step_flops(spec, cfg, batch_size, seq_len):
    """XLA FLOPs of one step at spec.num_layers, extrapolated from unrolled 1- and 2-layer models."""
    f1 = unrolled_flops(spec, cfg, batch_size, seq_len, 1)
    f2 = unrolled_flops(spec, cfg, batch_size, seq_len, 2)
    return f1 + (spec.num_layers - 1) * (f2 - f1)


def memory(compiled):
    """Argument, output, temp and alias bytes of a compiled step."""
    m = compiled.memory_analysis()
    return dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes))


def plan(cfg, remats=()):
    """The plan of config `cfg` as a dict; `remats` adds one row per named remat policy."""
    spec = config_lib.validate(cfg)
    batch_size, seq_len = cfg.train.micro_batch_size, cfg.data.seq_len
    counts = model_lib.count_params(spec)
    analytic = model_lib.flops_per_token(spec, seq_len)
    tokens = batch_size * seq_len
    result = dict(
        params=counts["total"], lowrank_params=counts["lowrank"], embedding_params=counts["embeddings"],
        tokens_per_step=tokens, flops_per_token=analytic["train"], forward_flops_per_token=analytic["forward"],
        xla_flops_per_step=step_flops(spec, cfg, batch_size, seq_len),
        memory=memory(compile_step(spec, cfg, batch_size, seq_len)))
    result["xla_flops_per_token"] = result["xla_flops_per_step"] / tokens
    result["remat"] = [remat_row(spec.replace(remat=name), cfg, batch_size, seq_len) for name in remats]
    return result


def remat_row(spec, cfg, batch_size, seq_len):
    """Temp memory, FLOPs and the per-block saved residuals of the step under spec.remat."""
    compiled = compile_step(spec, cfg, batch_size, seq_len)
    return dict(remat=spec.remat, temp_bytes=memory(compiled)["temp_bytes"],
                xla_flops_per_step=step_flops(spec, cfg, batch_size, seq_len))


def _gib(n):
    return f"{n / 2**30:8.2f} GiB"


def format_text(p):
    lines = [
        f"parameters        {p['params'] / 1e6:10.2f} M  (low-rank {p['lowrank_params'] / 1e6:.2f} M, "
        f"embeddings {p['embedding_params'] / 1e6:.2f} M)",
        f"FLOPs per token   {p['flops_per_token'] / 1e9:10.3f} G  training step, analytic "
        f"(forward {p['forward_flops_per_token'] / 1e9:.3f} G)",
        f"XLA FLOPs/token   {p['xla_flops_per_token'] / 1e9:10.3f} G  "
        f"({p['xla_flops_per_token'] / p['flops_per_token']:.3f}x analytic)",
        f"step              {p['tokens_per_step']:10d} tokens per device per micro-batch",
        "memory            " + ", ".join(f"{k.replace('_bytes', '')} {_gib(v).strip()}"
                                          for k, v in p["memory"].items()),
    ]
    for row in p["remat"]:
        lines.append(f"remat {row['remat']:<14s} temp {_gib(row['temp_bytes'])}  "
                     f"FLOPs/step {row['xla_flops_per_step'] / 1e12:8.2f} T")
    return "\n".join(lines)


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
    app.run(main)
