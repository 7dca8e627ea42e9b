"""Validation loss and perplexity: the training loop's evaluation and `python -m colax.evaluate`.

  python -m colax.evaluate --workdir DIR [--step N] [--convention token|reference] [--config.data.…=…]

Every validation batch i gives s_i, the summed next-token cross-entropy, and n_i, the number of
counted targets (`step.eval_sums`). Two conventions average them (docs/inference.md):

  token      loss = sum_i s_i / sum_i n_i            (the training loop's; every token weighs the same)
  reference  loss = sum_i (s_i / n_i) / (m + 1)      (the CoLA/GaLore code: the mean of per-batch mean
                                                      losses over m batches, divided by one batch more)

Perplexity is exp(loss). The command reads batches until more than `--max_tokens` non-pad input
tokens have been evaluated (the reference's stopping rule, 10M) or the split ends, and prints one
line of JSON.
"""

from colax import errors, host

if __name__ == "__main__":  # Ctrl-C while the imports below load: one line, exit 130
    errors.exit_on_signal("interrupted")
    host.reuse_freed_memory()  # before JAX starts its threads (colax.host)

import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from colax import data, sharding, state, step  # noqa: E402
from colax import progress as progress_lib  # noqa: E402
from colax import run as run_lib  # noqa: E402
from colax.errors import ConfigError, DataError, exit_on_error, parse_flags  # noqa: E402

CONVENTIONS = ("token", "reference")


def val_batches(cfg, tok, rows, limit=0):
    """An iterator over the first `limit` (0: all) validation batches of `rows` rows ([rows, T] host arrays)."""
    it = data.make_pipeline(cfg.data, tok, split="val", global_batch_size=rows)
    return itertools.islice(it, limit or None)


def make_batch_sums(graphdef, params, mesh):
    """batch_sums(params, host batch) -> device float32 [3]: s_i, n_i and the non-pad input tokens
    (segment id > 0; every token without segment ids) of one global batch (every host's
    [rows / hosts, T] arrays), the same on every host."""

    def sums(p, b):
        loss_sum, count = step.eval_sums(p, graphdef, b)
        inputs = (b["segment_ids"] > 0).sum() if "segment_ids" in b else b["inputs"].size
        return jnp.stack([loss_sum, count, jnp.float32(inputs)])

    fn = jax.jit(sharding.on_mesh(sums, mesh),
                 in_shardings=(state.tree_shardings(params, mesh), sharding.batch_sharding(mesh)))
    return lambda params, batch: fn(params, sharding.global_batch({k: v[None] for k, v in batch.items()}, mesh))


def mean_loss(sums, convention="token"):
    """The loss of per-batch sums float [m, >= 2] (s_i, n_i, ...) under `convention` (module docstring).

    The reference convention skips batches without a counted target (its per-batch mean is undefined).
    """
    if not len(sums):
        raise DataError("the validation split gave no batch to evaluate (data.val_docs, data.val_split)")
    sums = np.asarray(sums, np.float64)[:, :2]
    if convention == "token":
        return float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
    sums = sums[sums[:, 1] > 0]
    return float((sums[:, 0] / sums[:, 1]).sum() / (len(sums) + 1))


def perplexity(loss):
    return math.exp(min(loss, 700.0))


def sweep(batch_sums, params, batches, convention="token", max_tokens=0, progress=False):
    """Loss of `params` over `batches` (host batches), read until more than `max_tokens` non-pad
    input tokens (0: all). batch_sums: `make_batch_sums`'s. Returns {"loss", "ppl", "convention",
    "batches", "targets", "input_tokens"}. `progress`: progress lines on stderr (`colax.progress`)."""
    sums, inputs = [], 0
    say = functools.partial(print, file=sys.stderr, flush=True) if progress else lambda line: None
    counter = progress_lib.Progress("evaluate", say, total=max_tokens or None)
    for batch in batches:
        if max_tokens and inputs > max_tokens:
            break
        sums.append(jax.device_get(batch_sums(params, batch)))
        inputs += int(sums[-1][2])  # global: every host stops after the same batch
        counter.add(tokens=int(sums[-1][2]), batches=1)
    loss = mean_loss(sums, convention)
    counter.done(f"loss {loss:.4f}")
    return dict(loss=loss, ppl=perplexity(loss), convention=convention, batches=len(sums),
                targets=int(np.sum(sums, axis=0)[1]) if sums else 0, input_tokens=inputs)


def make_evaluate(graphdef, params, mesh, batches):
    """evaluate(params, stream=None, max_tokens=0) -> {"eval_loss", "eval_ppl", "eval_tokens",
    "eval_batches"}: the token convention over `batches` (the loop's fixed list), or over `stream`
    (e.g. the whole validation split) until more than `max_tokens` input tokens (0: all of it)."""
    batch_sums = make_batch_sums(graphdef, params, mesh)

    def evaluate(params, stream=None, max_tokens=0):
        r = sweep(batch_sums, params, batches if stream is None else stream, max_tokens=max_tokens)
        return dict(eval_loss=r["loss"], eval_ppl=r["ppl"], eval_tokens=r["input_tokens"], eval_batches=r["batches"])

    return evaluate


def evaluate_run(cfg, tok, graphdef, params, convention="token", max_tokens=10_000_000, rows=None, progress=False):
    """Loss of `params` on the validation split of `cfg.data`, read until more than `max_tokens`
    non-pad input tokens (0: the whole split).

    rows: batch rows (default: train.micro_batch_size x data-parallel devices). Returns `sweep`'s dict.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention must be one of {CONVENTIONS}, got {convention!r}")
    mesh = sharding.make_mesh(cfg.mesh)
    data_size, fsdp, _ = sharding.mesh_shape(cfg.mesh, jax.device_count())
    rows = rows or cfg.train.micro_batch_size * data_size * fsdp
    if rows % (data_size * fsdp):
        raise ConfigError(f"--batch_rows={rows} must be divisible by the data-parallel devices ({data_size * fsdp})")
    return sweep(make_batch_sums(graphdef, params, mesh), params, val_batches(cfg, tok, rows), convention,
                 max_tokens, progress)


def define_flags():
    """The command line flags of `python -m colax.evaluate` (defined only when run as a program)."""
    run_lib.define_run_flags()
    flags.DEFINE_enum("convention", "token", CONVENTIONS, "token: token-weighted mean loss; reference: the "
                      "CoLA/GaLore code's mean of per-batch means over one batch more than it ran.")
    flags.DEFINE_integer("max_tokens", 10_000_000, "Stop once more non-pad input tokens than this have been "
                         "evaluated; 0: the whole validation split.")
    flags.DEFINE_integer("batch_rows", 0, "Rows per batch; 0: train.micro_batch_size x data-parallel devices.")


@exit_on_error
def main(argv):
    cfg, tok, graphdef, params, ckpt_step = run_lib.load_run_from_flags(argv)
    f = flags.FLAGS
    result = evaluate_run(cfg, tok, graphdef, params, f.convention, f.max_tokens, f.batch_rows,
                          progress=sys.stderr.isatty())
    print(json.dumps(dict(workdir=f.workdir, step=ckpt_step, source=cfg.data.source, seq_len=cfg.data.seq_len,
                          **result)), flush=True)


if __name__ == "__main__":
    define_flags()
    flags.adopt_module_key_flags(run_lib)  # --help: the run's flags too (--workdir, --step, --config)
    app.run(main, flags_parser=parse_flags)
