"""The LLaMA decoder (full-rank or CoLA), its config section and its analytic counts.

`Transformer(spec, rngs=...)(tokens) -> logits`: tokens int32 [B, T] -> logits float32 [B, T, V].
The decoder blocks are stored stacked (every block parameter has a leading [L] axis) and run
either with `jax.lax.scan` (compile time independent of depth) or unrolled; both use the same
parameters, so a checkpoint serves either.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from colax import kernels, layers, projections, remat, sharding, xent
from colax.matmul import matmul
from colax.errors import ConfigError
from colax.projections.common import PROJECTION_NAMES, projection_shapes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def defaults():
    """The `config.model` section: a small CoLA model (see configs/ for the paper's sizes), then every
    projection kind's own keys (`projections.config_defaults()`: lora_alpha, sparse_density, ...)."""
    return ml_collections.ConfigDict(dict(
        projection="cola",        # a key of colax.projections.PROJECTIONS: "cola", "crnet", "dense" (full-rank), ...
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_heads=8,
        num_layers=8,
        rank=128,                 # rank of every low-rank projection ...
        ranks=ml_collections.ConfigDict({n: 0 for n in PROJECTION_NAMES}),  # ... unless > 0 here
        only_lr_act=False,        # MLP: down(gate(x) * up(x)) if True else down(silu(gate(x)) * up(x))
        rope_theta=10000.0,
        norm_eps=1e-6,
        init_std=0.02,            # embeddings, lm_head and full-rank projections
        scan_layers=True,         # lax.scan over blocks (False: unrolled)
        remat="none",             # a key of colax.remat.POLICIES
        dtype="bfloat16",         # compute dtype
        param_dtype="float32",    # "bfloat16" with dtype "bfloat16" is the paper's pure-bf16 mode
        attention_impl="",        # "": colax.attention on CPU, jax's pick elsewhere; "xla", "cudnn": jax.nn.dot_product_attention's
        kernel="xla",             # CoLA silu(z) @ B kernel: "xla" or "pallas" (GPU; docs/kernels.md)
        pad_id=ml_collections.FieldReference(None, field_type=int),  # embedding row kept at 0, never trained
        **projections.config_defaults(),  # each kind's own keys, documented where the kind declares them
    ))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A validated, hashable model config with dtypes resolved and ranks per projection."""
    projection: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    ranks: tuple  # ((projection name, rank), ...) in PROJECTION_NAMES order
    only_lr_act: bool
    rope_theta: float
    norm_eps: float
    init_std: float
    scan_layers: bool
    remat: str
    dtype: object
    param_dtype: object
    attention_impl: str
    kernel: str
    pad_id: object = None  # int or None
    options: tuple = ()  # ((key, value), ...): the projection kinds' own keys (`projections.config_defaults()`)
    scan_unroll: int = 1  # blocks per scan iteration; colax.plan sets 2 to count one block's FLOPs

    @property
    def rank(self):
        return dict(self.ranks)

    def __getattr__(self, name):
        """A projection kind's own key (e.g. `spec.lora_alpha`), read from `options`."""
        options = dict(self.__dict__.get("options", ()))
        if name not in options:
            raise AttributeError(f"ModelSpec has no field or option {name!r}")
        return options[name]

    def replace(self, **kw):
        """A copy with fields or options (a projection kind's keys) replaced."""
        options = dict(self.options)
        changed = {k: v for k, v in kw.items() if k in options}
        fields = {k: v for k, v in kw.items() if k not in options}
        return dataclasses.replace(self, **fields, options=tuple({**options, **changed}.items()))


def _require(ok, field, msg, value):
    if not ok:
        raise ConfigError(f"model.{field} {msg}, got {value!r}")


def spec_from_config(m):
    """Validates the `config.model` ConfigDict `m` and returns a ModelSpec (ConfigError if bad)."""
    _require(m.projection in projections.PROJECTIONS, "projection",
             f"must be one of {sorted(projections.PROJECTIONS)}", m.projection)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers"):
        _require(isinstance(m[field], int) and m[field] > 0, field, "must be a positive integer", m[field])
    _require(m.hidden_size % m.num_heads == 0, "num_heads", f"must divide hidden_size={m.hidden_size}",
             m.num_heads)
    _require((m.hidden_size // m.num_heads) % 2 == 0, "num_heads",
             "must leave an even head size for RoPE", m.num_heads)
    unknown = sorted(set(m.ranks) - set(PROJECTION_NAMES))
    _require(not unknown, "ranks", f"names unknown projections (known: {', '.join(PROJECTION_NAMES)})",
             unknown)
    lowrank = m.projection != "dense"
    if lowrank:
        _require(isinstance(m.rank, int) and m.rank > 0, "rank", "must be a positive integer", m.rank)
        shapes = projection_shapes(m.hidden_size, m.intermediate_size)
        for name in PROJECTION_NAMES:
            _require(isinstance(m.ranks[name], int) and m.ranks[name] >= 0, f"ranks.{name}",
                     "must be an integer >= 0 (0: use model.rank)", m.ranks[name])
            rank = m.ranks[name] or m.rank
            _require(rank < min(shapes[name]), "ranks." + name if m.ranks[name] else "rank",
                     f"must be smaller than both sides of the {name} projection {shapes[name]} "
                     "(else the low-rank pair has more weights than the full-rank matrix)", rank)
    _require(m.projection == "cola" or not m.only_lr_act, "only_lr_act",
             f"needs the cola projection (with the linear {m.projection!r} the MLP would have no activation)",
             m.only_lr_act)
    kind = projections.PROJECTIONS[m.projection]
    _require(not hasattr(kind, "first_layer") or m.num_layers >= 2, "num_layers",
             f"must be >= 2 for {m.projection} (block 1 is its full-rank first layer)", m.num_layers)
    _require(m.remat in remat.POLICIES, "remat", f"must be one of {sorted(remat.POLICIES)}", m.remat)
    _require(not remat.POLICIES[m.remat].inverts or hasattr(kind, "invert"), "remat",
             "needs a cross-layer projection that inverts (crnet)", m.remat)
    _require(lowrank or not remat.POLICIES[m.remat].lowrank, "remat",
             "needs a low-rank projection (the full-rank model takes none or full)", m.remat)
    for field in ("dtype", "param_dtype"):
        _require(m[field] in DTYPES, field, f"must be one of {sorted(DTYPES)}", m[field])
    _require(m.attention_impl in ("", "xla", "cudnn"), "attention_impl", "must be '', 'xla' or 'cudnn'",
             m.attention_impl)
    kernels.check_kernel(m.kernel, kernels.cola_pallas.INTERPRET)
    _require(m.pad_id is None or 0 <= m.pad_id < m.vocab_size, "pad_id",
             f"must be None or an id in [0, vocab_size={m.vocab_size})", m.pad_id)
    for other in projections.PROJECTIONS.values():  # every kind's own keys, whichever kind is used
        if hasattr(other, "check_config"):
            other.check_config(m, _require, selected=other is kind)
    ranks = tuple((n, (m.ranks[n] or m.rank) if lowrank else 0) for n in PROJECTION_NAMES)
    options = tuple((key, float(m[key]) if isinstance(default, float) else m[key])
                    for key, default in projections.config_defaults().items())
    return ModelSpec(
        projection=m.projection, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_heads=m.num_heads, num_layers=m.num_layers,
        ranks=ranks, only_lr_act=bool(m.only_lr_act), rope_theta=float(m.rope_theta),
        norm_eps=float(m.norm_eps), init_std=float(m.init_std), scan_layers=bool(m.scan_layers),
        remat=m.remat, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
        attention_impl=m.attention_impl, kernel=m.kernel, pad_id=m.pad_id, options=options)


class _BlockCfg:
    """The attributes `layers.Block` reads, with `ranks` as a dict."""

    def __init__(self, spec):
        self.__dict__.update(dataclasses.asdict(spec), **dict(spec.options))
        self.ranks = spec.rank


def _positions(tokens, positions):
    """`positions`, or 0..T-1 per row of tokens int32 [B, T] where None."""
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return positions


class Transformer(nnx.Module):
    """LLaMA decoder: embed -> L pre-norm blocks -> RMSNorm -> lm_head (untied, full-rank).

    With `spec.pad_id`, that embedding row starts at zero and gets no gradient (torch's
    `padding_idx`, as the reference code's embedding): AdamW then leaves it at zero. With a
    cross-layer projection kind (CR-Net) block 1 is `first_block` (its own parameters, no [L]
    axis) and `blocks` holds the other L - 1; the blocks pass their carry along (`layers.Block`).
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        cfg = _BlockCfg(spec)
        normal = nnx.initializers.normal(stddev=spec.init_std)
        d, v = spec.hidden_size, spec.vocab_size
        embed = normal(rngs.params(), (v, d), spec.param_dtype)
        self.embed = nnx.Param(embed if spec.pad_id is None else embed.at[spec.pad_id].set(0))
        cross_layer = is_cross_layer(spec)
        self.first_block = layers.Block(cfg, first=True, rngs=rngs) if cross_layer else None

        @nnx.split_rngs(splits=spec.num_layers - cross_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return layers.Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = layers.RMSNorm(d, cfg, rngs=rngs)
        self.lm_head = nnx.Param(normal(rngs.params(), (d, v), spec.param_dtype))

    def __call__(self, tokens, positions=None, segment_ids=None, capture=False, key=None):
        """tokens: int32 [B, T]; positions, segment_ids: int32 [B, T] or None -> float32 [B, T, V].

        positions default to 0..T-1 per row; segment_ids (packed rows) keep attention inside a
        document. With `capture`, returns (logits, acts): acts[projection]["y"] [L, B, T, out] is
        each projection's output and, for CoLA, acts[projection]["z"] [L, B, T, r] its bottleneck
        (`bottleneck` method), for `colax.analysis` (CR-Net: "y" only; block 1 has no bottleneck).
        `key`: a training forward pass's PRNG key for the projection kind's dropout (`uses_rng`),
        split over the stacked blocks; None (evaluation, generation): no dropout.
        """
        x, acts = self._blocks(tokens, _positions(tokens, positions), segment_ids, capture=capture, key=key)
        logits = self._logits(x)
        return (logits, acts) if capture else logits

    def loss(self, tokens, targets, mask, positions=None, segment_ids=None, key=None):
        """Summed token cross-entropy of `__call__`'s logits against `targets` (int32 [B, T]) weighted
        by `mask` (float32 [B, T]): a float32 scalar from `xent.lm_head_loss`, which never holds the
        [B, T, V] logits whole. Other arguments as `__call__`'s."""
        x, _ = self._blocks(tokens, _positions(tokens, positions), segment_ids, key=key)
        return xent.lm_head_loss(self.final_norm(x), self._head(), targets, mask)

    def decode(self, tokens, positions, cache, at=None):
        """One step of generation over a KV cache (`init_cache`), through the same blocks.

        tokens, positions: int32 [B, T] (the slot each token's k and v are written to); cache:
        {"k", "v"} [L, B, S, N, H]; at: int32 [B] or None. Returns (logits, updated cache):
        float32 [B, V] at position at[b] of row b, or [B, T, V] with `at` None.
        """
        x, cache = self._blocks(tokens, positions, None, cache=cache)
        if at is not None:
            x = x[jnp.arange(x.shape[0]), at]
        return self._logits(x), cache

    def _blocks(self, tokens, positions, segment_ids, capture=False, cache=None, key=None):
        """Embedding and the L blocks: (x [B, T, D] compute dtype, per-layer outputs stacked [L, ...]):
        the captured activations, the updated cache, or None. `key`: dropout's, for the stacked blocks."""
        spec = self.spec
        table = sharding.constrain(self.embed[...].astype(spec.dtype), ("vocab", "act_embed"))  # FSDP-gathered
        x = sharding.constrain(self._embed_rows(table, tokens), sharding.BTD)
        first = self.first_block is not None
        carry, first_out = (x, {}), None
        if first:  # block 1 of a cross-layer kind, with layer 0 of the cache
            first_cache, cache = (None, None) if cache is None else (
                jax.tree.map(lambda a: a[0], cache), jax.tree.map(lambda a: a[1:], cache))
            graphdef, state = nnx.split(self.first_block)
            body = remat.checkpointed(_layer_fn(graphdef, capture), spec.remat)
            carry, first_out = body(carry, (state, first_cache, None), positions, segment_ids)
        graphdef, stacked = nnx.split(self.blocks)
        if remat.POLICIES[spec.remat].inverts and not capture and cache is None:
            carry = inverted_blocks(graphdef, carry, stacked, (positions, segment_ids),
                                    remat.segment_ends(spec.num_layers),
                                    unroll=spec.scan_unroll if spec.scan_layers else True)
            return carry[0], None
        body = remat.checkpointed(_layer_fn(graphdef, capture), spec.remat, prevent_cse=not spec.scan_layers)
        if _packs_residuals(spec) and not capture and cache is None:
            body = remat.packed_residuals(body)
        step = lambda carry, layer: body(carry, layer, positions, segment_ids)
        layers_in = (stacked, cache, None if key is None else jax.random.split(key, spec.num_layers - first))
        if spec.scan_layers:
            carry, out = jax.lax.scan(step, carry, layers_in, unroll=spec.scan_unroll)
        else:
            per_layer = []
            for i in range(spec.num_layers - first):
                carry, layer_out = step(carry, jax.tree.map(lambda a: a[i], layers_in))
                per_layer.append(layer_out)
            out = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        return carry[0], (out if first_out is None else _prepend(first_out, out))

    def _head(self):
        """The lm_head [D, V] in the compute dtype."""
        return self.lm_head[...].astype(self.spec.dtype)

    def _logits(self, x):
        """Final norm and lm_head: x [..., D] compute dtype -> float32 [..., V]."""
        x = self.final_norm(x)
        axes = ("batch", "length", "act_vocab") if x.ndim == 3 else ("batch", "act_vocab")
        logits = sharding.constrain(matmul(x, self._head()), axes)
        return logits.astype(jnp.float32)

    def _embed_rows(self, table, tokens):
        """table [V, D], tokens int32 [B, T] -> [B, T, D]; rows of `spec.pad_id` pass no gradient."""
        x = table[tokens]
        if self.spec.pad_id is None:
            return x
        return jnp.where((tokens == self.spec.pad_id)[..., None], jax.lax.stop_gradient(x), x)


def init_cache(spec: ModelSpec, batch, length):
    """An empty KV cache for `Transformer.decode`: {"k", "v"} zeros [L, batch, length, N, H] in the
    compute dtype (keys are stored after RoPE)."""
    shape = (spec.num_layers, batch, length, spec.num_heads, spec.hidden_size // spec.num_heads)
    return {"k": jnp.zeros(shape, spec.dtype), "v": jnp.zeros(shape, spec.dtype)}


def _packs_residuals(spec):
    """Whether scanned blocks keep their bf16 residuals as uint16 bits (`remat.packed_residuals`): on
    the CPU backend, where XLA:CPU 0.10 runs bf16 dynamic-update-slices through f32 and keeps the
    stacked residuals in f32; not for a policy that offloads them (a GPU/TPU feature)."""
    return (spec.scan_layers and spec.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
            and not remat.POLICIES[spec.remat].offload)


def _layer_fn(graphdef, capture):
    """One block as a function: ((x, carry), (block state, KV cache or None, dropout key or None),
    positions, segment_ids) -> ((x', carry'), its updated cache, or its `_projection_values` with
    `capture`, else None)."""

    def layer(carry, block_layer, positions, segment_ids):
        block_state, cache, key = block_layer
        block = nnx.merge(graphdef, block_state)
        if cache is not None:
            return block(carry[0], positions, segment_ids, carry[1], cache)
        if not capture:
            return block(carry[0], positions, segment_ids, carry[1], key=key), None
        carry, outputs = nnx.capture(block, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            carry[0], positions, segment_ids, carry[1])
        return carry, _projection_values(nnx.to_pure_dict(outputs))

    return layer


def inverted_blocks(graphdef, carry, stacked, extra, ends, unroll=1):
    """Blocks 2..L as `remat.inverted_scan` (the `crnet` policy): carry (x, outputs of the block
    before), stacked block states [n, ...], extra (positions, segment_ids) -> the last carry.

    A block's residuals are its projections' bottlenecks ("z" of `_projection_values`) and
    `Block.invert` undoes its carry update.
    """
    layer = _layer_fn(graphdef, capture=True)

    def step(carry, block_state, extra):
        carry, acts = layer(carry, (block_state, None, None), *extra)
        return carry, {name: values["z"] for name, values in acts.items()}

    def invert(block_state, outputs, bottlenecks):
        return nnx.merge(graphdef, block_state).invert(outputs, bottlenecks)

    return remat.inverted_scan(step, invert, carry, stacked, extra, ends, unroll=unroll)


def _prepend(first, rest):
    """Block 1's values (captured, or its cache) before the other blocks' [L - 1, ...]; a captured
    value block 1 lacks (CR-Net's "z": its block 1 is full-rank) is left out."""
    if isinstance(rest, dict):
        return {k: _prepend(first[k], v) for k, v in rest.items() if k in first}
    return jnp.concatenate([first[None], rest])


def is_cross_layer(spec):
    """Whether the projection kind passes outputs from block to block (has a `first_layer`)."""
    return hasattr(projections.PROJECTIONS[spec.projection], "first_layer")


def _projection_values(outputs):
    """Method outputs captured in a block -> {projection: {"y": output, "z": bottleneck (CoLA)}}."""
    names = {"__call__": "y", "bottleneck": "z"}
    return {p: {names[m]: values[0] for m, values in outputs[p].items() if m in names}
            for p in PROJECTION_NAMES}


def uses_rng(spec: ModelSpec):
    """Whether a training forward pass takes a PRNG key: the projection kind's `uses_rng(spec)`
    (LoRA's dropout), False for kinds without one."""
    return getattr(projections.PROJECTIONS[spec.projection], "uses_rng", lambda spec: False)(spec)


def trainable_mask(params, full_rank=False):
    """True for each parameter the optimizer trains, False for the frozen ones: integer leaves
    (e.g. index sets) and the parameters a projection kind names in its `frozen` attribute
    (changed only between steps, by the method's hook); with `full_rank` (the full-rank warm start,
    `optim.full_rank_steps`) those it names in `full_rank_frozen` instead. params: the model's
    pure-dict state."""
    names = "full_rank_frozen" if full_rank else "frozen"
    frozen = {leaf for kind in projections.PROJECTIONS.values() for leaf in getattr(kind, names, ())}

    def trainable(path, leaf):
        keys = tuple(getattr(k, "key", None) for k in path)
        named_frozen = len(keys) == 3 and keys[0] in ("blocks", "first_block") and keys[2] in frozen
        return jnp.issubdtype(leaf.dtype, jnp.inexact) and not named_frozen

    return jax.tree_util.tree_map_with_path(trainable, params)


def abstract_model(spec: ModelSpec):
    """The model with ShapeDtypeStructs for parameters (nothing allocated; fine for 7B)."""
    return nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(0)))


def count_params(spec: ModelSpec):
    """Parameter counts read off the model: {"total", "lowrank", "embeddings", "projections", "norms",
    "state", "trainable", "trainable_full_rank"}; the last two count what the optimizer trains (`trainable_mask`)
    in the low-rank phase and in a full-rank warm start (`optim.full_rank_steps`).

    Integer leaves (SLTrain's support) are model state, not parameters; a projection kind's
    `padding` (stored entries that are not parameters) is left out too, and so are the float leaves
    it names in `state_leaves` (SwitchLoRA's candidate pools), counted in "state" instead. "lowrank"
    is the projections of the stacked blocks of a low-rank kind (not CR-Net's full-rank block 1).
    """
    counts = dict(total=0, lowrank=0, embeddings=0, projections=0, norms=0, state=0)
    params = nnx.to_pure_dict(nnx.state(abstract_model(spec)))
    state_leaves = getattr(projections.PROJECTIONS[spec.projection], "state_leaves", ())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] in state_leaves:
            counts["state"] += leaf.size
        if not jnp.issubdtype(leaf.dtype, jnp.inexact) or keys[-1] in state_leaves:
            continue
        group = ("embeddings" if keys[0] in ("embed", "lm_head") else
                 "projections" if keys[0] in ("blocks", "first_block") and keys[1] in PROJECTION_NAMES
                 else "norms")
        counts[group] += leaf.size
        counts["total"] += leaf.size
        counts["lowrank"] += leaf.size if group == "projections" and keys[0] == "blocks" else 0
    for name, full_rank in (("trainable", False), ("trainable_full_rank", True)):
        counts[name] = sum(leaf.size for leaf, trained in zip(
            jax.tree.leaves(params), jax.tree.leaves(trainable_mask(params, full_rank))) if trained)
    kind = projections.PROJECTIONS[spec.projection]
    if hasattr(kind, "padding"):
        shapes = projection_shapes(spec.hidden_size, spec.intermediate_size)
        padding = spec.num_layers * sum(kind.padding(i, o, spec.rank[n], spec) for n, (i, o) in shapes.items())
        for group in ("projections", "total", "lowrank", "trainable", "trainable_full_rank"):
            counts[group] -= padding
    counts["lowrank"] *= spec.projection != "dense"
    return counts


def flops_per_token(spec: ModelSpec, seq_len):
    """Analytic matmul FLOPs per token: {"forward", "train"}.

    Projections and lm_head: 2 FLOPs per weight; attention: QK^T and AV over the full [T, T]
    score matrix (as XLA computes it), 4 * T * D per layer. Elementwise work is not counted.
    train = 3 x forward (forward, input gradient, weight gradient), less the weight gradients never
    computed: a kind's `frozen_flops_per_token(in, out, rank)` is the forward FLOPs of its matmuls
    with a frozen weight (LoRA's x Wᵀ), counted twice instead of three times.
    """
    kind = projections.PROJECTIONS[spec.projection]
    shapes = projection_shapes(spec.hidden_size, spec.intermediate_size)
    first = kind.first_layer if is_cross_layer(spec) else kind  # block 1 of a cross-layer kind

    def blocks(method):  # sum over every block's projections of kind.method (0 where a kind has none)
        proj = lambda kind: sum(getattr(kind, method, lambda i, o, r: 0)(i, o, spec.rank[n])
                                for n, (i, o) in shapes.items())
        return proj(first) + (spec.num_layers - 1) * proj(kind)

    attn = 4 * seq_len * spec.hidden_size
    forward = blocks("flops_per_token") + spec.num_layers * attn + 2 * spec.hidden_size * spec.vocab_size
    return dict(forward=forward, train=3 * forward - blocks("frozen_flops_per_token"))
