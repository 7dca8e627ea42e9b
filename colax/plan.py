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
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
# Public only through print_saved_residuals, which prints this list of (aval, description).
from jax._src.ad_checkpoint import saved_residuals as _saved_residuals  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from colax import config as config_lib  # noqa: E402
from colax import model as model_lib  # noqa: E402
from colax import kernels, optim, remat, sharding, state, step, xent  # noqa: E402
from colax import trainer as trainer_lib  # noqa: E402
from colax.errors import ConfigError, exit_on_error, parse_flags  # noqa: E402
from colax.projections.common import projection_shapes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_REMAT = flags.DEFINE_string("remat", "", "Comma-separated remat policies to compare, one row each: " + "; ".join(
    f"{name}: {r.doc}" for name, r in remat.POLICIES.items()))
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "Compile the training step with libtpu for this TPU topology "
                                "(e.g. v5e:2x2, v5p:2x2x4; the tpu extra) instead of for this host.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "--topology: slices of the topology (multi-slice).")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "--topology: the compiler's step-time estimate (compiles two "
                              "4-block copies and one loss chunk more).")


def compile_step(spec, cfg, batch_size, seq_len):
    """Compiles one training step (one micro-batch [batch_size, seq_len]) from abstract shapes, with
    dropout's PRNG key where the model takes one (`model.uses_rng`)."""
    graphdef, state = nnx.split(model_lib.abstract_model(spec))
    params = nnx.to_pure_dict(state)
    tx = optim.make(cfg.optim, cfg.train.steps, projection=cfg.model.projection)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32)
    batch = dict(inputs=tokens, targets=tokens, loss_mask=jax.ShapeDtypeStruct(tokens.shape, jnp.float32))
    train_step = jax.jit(step.make_train_step(graphdef, tx), donate_argnums=(0, 1))
    key = (jax.eval_shape(lambda: jax.random.key(0)),) if model_lib.uses_rng(spec) else ()
    return train_step.lower(params, opt_state, batch, *key).compile()


def xla_cost(compiled):
    """XLA's cost analysis of a compiled program as a dict ("flops", "bytes accessed", on TPU
    "optimal_seconds", ...); a dict, or a one-element list on older jax."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def xla_flops(compiled):
    """FLOPs from XLA's cost analysis."""
    return float(xla_cost(compiled)["flops"])


def scan_correction(spec, cost_of):
    """What XLA's cost analysis leaves out of a scanned model's blocks, {name: value}: (S - n) times
    one block's cost for S scanned blocks run as n scans, one block's being cost(4 scanned blocks, 2
    a scan iteration) - cost(4 scanned blocks, 1 an iteration); {} for an unrolled model.
    `cost_of(spec) -> {name: float}`: the costs to correct (FLOPs, the TPU compiler's seconds) of the
    step of a copy of `spec`.
    """
    if not spec.scan_layers:
        return {}
    unscanned = int(model_lib.is_cross_layer(spec))
    loops = len(remat.segment_ends(spec.num_layers)) if remat.POLICIES[spec.remat].inverts else 1
    copy = spec.replace(num_layers=4 + unscanned)
    one, two = (cost_of(copy.replace(scan_unroll=u)) for u in (1, 2))
    return {name: (spec.num_layers - unscanned - loops) * (two[name] - one[name]) for name in one}


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
    flops += scan_correction(spec, lambda s: dict(flops=xla_flops(compile_step(s, cfg, batch_size, seq_len)))).get(
        "flops", 0.0)
    chunks = seq_len // xent.sequence_chunk(batch_size, seq_len)
    if chunks > 1:  # one chunk: nothing uncounted, nothing to compile
        flops += (chunks - 1) * xla_flops(loss_chunk_compiled(spec, batch_size, seq_len))
    return flops


def loss_chunk_compiled(spec, batch_size, seq_len, mesh=None):
    """One sequence chunk of `xent.lm_head_loss` and its gradients, compiled: x [B, chunk, D] and
    w [D, V] in spec.dtype, targets int32 and mask float32 [B, chunk] (B = batch_size rows); on
    `mesh` (None: one device of the host) the rows split and w placed as in the training step."""
    chunk = xent.sequence_chunk(batch_size, seq_len)
    logical = [sharding.BTD, ("embed", "vocab"), ("batch", "length"), ("batch", "length")]
    shapes = [(batch_size, chunk, spec.hidden_size), (spec.hidden_size, spec.vocab_size), (batch_size, chunk),
              (batch_size, chunk)]
    dtypes = [spec.dtype, spec.dtype, jnp.int32, jnp.float32]
    place = (lambda axes: None) if mesh is None else (lambda axes: NamedSharding(mesh, sharding.logical_spec(axes)))
    args = [jax.ShapeDtypeStruct(s, d, sharding=place(a)) for s, d, a in zip(shapes, dtypes, logical)]
    loss = jax.value_and_grad(xent.lm_head_loss, (0, 1))
    return jax.jit(loss if mesh is None else sharding.on_mesh(loss, mesh)).lower(*args).compile()


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
        state = jax.eval_shape(optim.make(o, cfg.train.steps, projection=cfg.model.projection).init, params)
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


# --topology: HBM a chip (GiB) and peak dense bf16 FLOP/s a chip, by TPU generation (Google Cloud's
# published figures). The compiler keeps a little HBM for itself (v5e: it fits to 15.75 GiB).
TPU_CHIPS = {"v4": (32, 275e12), "v5e": (16, 197e12), "v5p": (95, 459e12), "v6e": (32, 918e12)}
# libtpu reads these at start-up and warns when the first two are unset (no TPU attached here).
TPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # and no lock: compiles may run side by side
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s+(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-done)?\(")
_HLO_ARRAY = re.compile(r"\b(?:pred|[a-z]+?(\d+)[a-z0-9]*)\[([\d,]*)\]")  # bf16[8,128]: bits, dims
# "... the total memory required for HLO temporaries (31.51G) exceeds available HBM (15.75G)." (libtpu 0.0.42)
_OUT_OF_MEMORY = re.compile(r"required for ([^(]*?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def topology_devices(topology, num_slices=1):
    """The devices of TPU topology `topology` ("v5e:2x2", "v5p:2x2x4", ...) times `num_slices`, from
    libtpu (no TPU needed); ConfigError (one line) for an unknown generation, or a name libtpu refuses
    or no libtpu (the `tpu` extra)."""
    generation = topology.split(":")[0]
    if generation not in TPU_CHIPS:
        raise ConfigError(f"--topology={topology}: unknown TPU generation {generation!r} "
                          f"(known: {', '.join(TPU_CHIPS)}), e.g. v5e:2x2")
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices).devices
    except Exception as e:  # jax raises RuntimeError, XlaRuntimeError, ValueError here
        raise ConfigError(f"--topology={topology}: libtpu gives no devices ({errors.cause(e)}); "
                          "is the tpu extra installed (pip install -e '.[tpu]')?") from e


def per_chip_bytes(tree):
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _hlo_bytes(shape):
    """Bytes of an HLO result shape such as "bf16[8,128]{1,0}" or "(f32[2]{0}, s32[])"."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * int(bits or 8) // 8
               for bits, dims in _HLO_ARRAY.findall(shape))


def collective_bytes(hlo_text):
    """{kind: {"count", "bytes"}} of the collectives (`COLLECTIVES`) in compiled HLO text: the result
    bytes of each op (an async pair counted once, at its -done), a loop body's ops once."""
    found = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        row = found.setdefault(m.group(2), dict(count=0, bytes=0))
        row["count"] += 1
        row["bytes"] += _hlo_bytes(m.group(1))
    return found


def _scaled(number, unit):
    return float(number) * 1024 ** " KMGT".index(unit or " ")


def needed_bytes(message):
    """(what, needed, available) from the TPU compiler's RESOURCE_EXHAUSTED message: what needs the
    bytes ("HLO temporaries"), and the HBM bytes it needs and has; None if the message says no such."""
    m = _OUT_OF_MEMORY.search(message)
    return (m.group(1), _scaled(*m.group(2, 3)), _scaled(*m.group(4, 5))) if m else None


def lower_for_devices(cfg, devices, spec=None):
    """(lowered step, mesh, abstract (params, opt_state), micro-batches A) of the training step train.py
    runs for `cfg` (`trainer.Trainer.jitted_step`: the same abstract state, shardings, remat policy,
    A micro-batches [A, micro_batch_size * data * fsdp, seq_len] int32/float32 batch arrays; the
    low-rank phase of a config with a full-rank warm start), on a `sharding.make_mesh` of `devices`.
    `spec`: the model, if not `cfg.model`'s (a copy `scan_correction` asks for)."""
    spec = spec or config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    state.validate(spec, mesh, cfg.train.batch_size)
    accum = config_lib.accum_steps(cfg, len(devices))
    trainer = trainer_lib.Trainer(cfg, nnx.graphdef(model_lib.abstract_model(spec)), mesh)
    full_rank = trainer.full_rank(cfg.optim.full_rank_steps)
    abstract = state.abstract_state(spec, trainer.tx(cfg.optim.full_rank_steps), mesh)
    rows = sharding.batch_sharding(mesh)
    shape = (accum, cfg.train.batch_size // accum, cfg.data.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.float32 if name == "loss_mask" else jnp.int32, sharding=rows)
             for name in ("inputs", "targets", "loss_mask") + (("positions", "segment_ids") if cfg.data.packing
                                                                 else ())}
    key = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),) if trainer.rng else ()
    lowered = trainer.jitted_step(full_rank, *abstract).lower(*abstract, batch, *key)
    return lowered, mesh, abstract, accum


def _compile(lowered):
    """(compiled, None), or (None, the compiler's one-line message) where it runs out of memory."""
    try:
        return lowered.compile(), None
    except Exception as e:  # XlaRuntimeError (jaxlib's, no stable public name)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, errors.cause(e)


def _with(cfg, **overrides):
    """A copy of `cfg` with dotted-key overrides ("train.micro_batch_size": 4, ...)."""
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return cfg


def fits(cfg, devices):
    """Whether the TPU compiler fits `cfg`'s step on `devices` (False where a field does not apply)."""
    try:
        return _compile(lower_for_devices(cfg, devices)[0])[0] is not None
    except ConfigError:
        return False


def smallest_fitting_change(cfg, devices, needed, room):
    """The first single change, in this order, whose step the TPU compiler fits, as "--config.k=v"
    text, or None: a smaller micro-batch (from micro * room / needed, then halves: the largest that
    fits, up to 4 tried), then a heavier remat policy (`cola_m`, `full`), then FSDP over every chip
    (mesh data=1, fsdp=-1). `needed`: the temporaries' bytes in the compiler's RESOURCE_EXHAUSTED
    message; `room`: the HBM bytes left beside the state (<= 0: no micro-batch can fit)."""
    micro = cfg.train.micro_batch_size
    sizes = [micro >> (max(1, math.ceil(math.log2(needed / room))) + i) for i in range(4)] if room > 0 else []
    candidates = [{"train.micro_batch_size": m} for m in dict.fromkeys(sizes) if m]
    candidates += [{"model.remat": r} for r in ("cola_m", "full") if r != cfg.model.remat]  # fits(): False where
    # the policy does not apply (cola_m on a full-rank model)
    if cfg.mesh.fsdp != -1:
        candidates.append({"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": cfg.mesh.tensor})
    for change in candidates:
        if fits(_with(cfg, **change), devices):
            return " ".join(f"--config.{k}={v}" for k, v in change.items())
    return None


def tpu_plan(cfg, topology, num_slices=1, estimate=True):
    """The plan of `cfg`'s training step compiled by libtpu for TPU topology `topology` (see the
    module docstring): per-chip bytes, fit, FLOPs, collectives and (`estimate`) the compiler's
    step-time estimate, as a dict (the keys `format_tpu_text` prints)."""
    devices = topology_devices(topology, num_slices)
    generation = topology.split(":")[0]
    hbm_gib, peak = TPU_CHIPS[generation]
    start = time.perf_counter()
    with kernels.compiling_for("tpu"):
        lowered, mesh, abstract, accum = lower_for_devices(cfg, devices)
        compiled, message = _compile(lowered)
    result = dict(topology=topology, num_slices=num_slices, chips=len(devices), device_kind=devices[0].device_kind,
                  hbm_bytes=hbm_gib * 2**30, peak_flops=peak, mesh=dict(mesh.shape), accum_steps=accum,
                  tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
                  param_bytes=per_chip_bytes(abstract[0]), optimizer_bytes=per_chip_bytes(abstract[1]),
                  compile_seconds=time.perf_counter() - start)  # lowering and compiling the step
    if compiled is None:
        result.update(fits=False, error=message)
        need = needed_bytes(message)
        if need:
            what, needed, available = need
            result.update(needed_for=what, needed_bytes=needed, compiler_hbm_bytes=available)
            state_bytes = result["param_bytes"] + result["optimizer_bytes"] if "temporaries" in what else 0
            with kernels.compiling_for("tpu"):
                result["fit_change"] = smallest_fitting_change(cfg, devices, needed, available - state_bytes)
        return result
    mem = memory(compiled)
    mem["total_bytes"] = mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    result.update(memory=mem, fits=mem["total_bytes"] <= result["hbm_bytes"],
                  collectives=collective_bytes(compiled.as_text()))
    result["flops_per_chip"] = xla_flops(compiled)  # as compiled: a loop body counted once
    if estimate:
        start = time.perf_counter()
        result["estimate"] = step_estimate(cfg, compiled, devices, mesh, accum, peak)
        result["estimate"]["compile_seconds"] = time.perf_counter() - start
    return result


def step_estimate(cfg, compiled, devices, mesh, accum, peak):
    """The TPU compiler's estimate of one optimizer step: {"flops_per_chip", "seconds", "tokens_per_second",
    "mfu", "note", "parts"} ("parts": the {"flops", "optimal_seconds"} of the step as compiled and of
    what the corrections add, per micro-batch). Its cost analysis counts a loop body once: the scanned blocks are corrected as
    `scan_correction` does (compiling two 4-block copies) and the loss's sequence chunks as
    `step_flops` does; the micro-batch loop is counted A times (so is the optimizer update: exact
    for A = 1). seconds etc. are None, and "note" says why, where the compiler gives no estimate or
    a negative one. `peak`: the chip's peak FLOP/s (MFU = flops_per_chip / (seconds * peak))."""
    spec = config_lib.validate(cfg, len(devices))
    keys = ("flops", "optimal_seconds")
    cost = lambda c: {k: float(xla_cost(c).get(k, math.nan)) for k in keys}

    copy_cost = lambda copy: cost(lower_for_devices(cfg, devices, copy)[0].compile())

    with kernels.compiling_for("tpu"):
        total = cost(compiled)
        parts = [total, scan_correction(spec, copy_cost)]
        rows, seq_len = cfg.train.batch_size // accum, cfg.data.seq_len
        chunks = seq_len // xent.sequence_chunk(rows, seq_len)
        if chunks > 1:
            chunk = cost(loss_chunk_compiled(spec, rows, seq_len, mesh))
            parts.append({k: (chunks - 1) * v for k, v in chunk.items()})
    summed = {k: accum * sum(p[k] for p in parts if p) for k in keys}
    bad = [p["optimal_seconds"] for p in parts if p and not p["optimal_seconds"] > 0]
    result = dict(flops_per_chip=summed["flops"], seconds=None, tokens_per_second=None, mfu=None, note=None,
                  parts=dict(zip(("as_compiled", "blocks_added", "loss_chunks_added"), parts)))
    if bad or not summed["optimal_seconds"] > 0:
        result["note"] = ("the compiler gave no step-time estimate" if any(math.isnan(b) for b in bad)
                          else f"the compiler's step-time estimate is not positive ({bad[0] if bad else summed['optimal_seconds']:.4g} s)")
        return result
    seconds = summed["optimal_seconds"]
    return dict(result, seconds=seconds, tokens_per_second=cfg.train.batch_size * seq_len / seconds,
                mfu=summed["flops"] / (seconds * peak))


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


def format_tpu_text(p):
    """The text `python -m colax.plan --topology` prints of a `tpu_plan` dict."""
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"topology          {p['topology']} x {p['num_slices']} slice(s): {p['chips']} chips ({p['device_kind']}), "
             f"mesh {mesh}, {p['accum_steps']} micro-batch(es), {p['tokens_per_step']} tokens a step",
             f"per chip          parameters {_gib(p['param_bytes']).strip()}, "
             f"optimizer state {_gib(p['optimizer_bytes']).strip()}"]
    if "memory" in p:
        m = p["memory"]
        lines.append("per chip, XLA     " + ", ".join(f"{k} {_gib(m[k + '_bytes']).strip()}" for k in
                                                      ("argument", "temp", "output", "alias")))
        lines.append(f"HBM               {_gib(m['total_bytes']).strip()} of {_gib(p['hbm_bytes']).strip()} a chip: "
                     + ("fits" if p["fits"] else "does not fit")
                     + f" (arguments + temp + outputs - aliased; compiled in {p['compile_seconds']:.0f} s)")
        lines.append(f"FLOPs per chip    {p['flops_per_chip'] / 1e12:10.3f} T  as compiled (a loop body counted once)")
        lines.append("collectives       " + (", ".join(f"{k} {v['count']} ops {_gib(v['bytes']).strip()}"
                                                       for k, v in p["collectives"].items()) or "none")
                     + "  (results per chip, a loop body's once)")
    else:
        need = (f"its {p['needed_for']} need {_gib(p['needed_bytes']).strip()}, the chip has "
                f"{_gib(p['compiler_hbm_bytes']).strip()}" if p.get("needed_bytes") else p["error"])
        lines.append(f"HBM               does not fit: the TPU compiler says {need}; "
                     + (f"fits with {p['fit_change']}" if p.get("fit_change") else
                        "no single change of micro-batch, remat or fsdp fits"))
    e = p.get("estimate")
    if e:
        if e["seconds"] is None:
            lines.append(f"step time         n/a: {e['note']} (FLOPs per chip {e['flops_per_chip'] / 1e12:.3f} T)")
        else:
            lines.append(f"step time         {e['seconds'] * 1e3:10.1f} ms  the TPU compiler's estimate, not a measurement: "
                         f"{e['tokens_per_second']:.0f} tokens/s, MFU {100 * e['mfu']:.1f} % of "
                         f"{p['peak_flops'] / 1e12:.0f} TFLOP/s ({e['flops_per_chip'] / 1e12:.3f} TFLOPs a chip a step; "
                         f"its compiles {e['compile_seconds']:.0f} s)")
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
    if _TOPOLOGY.value:
        if remats:
            raise app.UsageError("--remat compares policies on this host; with --topology use --config.model.remat=...")
        if _NUM_SLICES.value < 1:
            raise app.UsageError(f"--num_slices must be >= 1, got {_NUM_SLICES.value}")
        for name, value in TPU_ENV.items():  # silences libtpu's start-up warnings (no TPU attached)
            os.environ.setdefault(name, value)
        if not os.environ.get("JAX_PLATFORMS"):  # this host only traces: libtpu compiles for the topology
            jax.config.update("jax_platforms", "cpu")
        p = tpu_plan(cfg, _TOPOLOGY.value, _NUM_SLICES.value, _ESTIMATE.value)
        print(json.dumps(p) if _JSON.value else format_tpu_text(p))
        return
    p = plan(cfg, remats)
    print(json.dumps(p) if _JSON.value else format_text(p))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
