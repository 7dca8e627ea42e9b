"""LLaMA building blocks: RMSNorm, RoPE, attention, the decoder block.

Shapes: B batch, T sequence, D hidden size, N heads, H head size (D = N * H), F intermediate size,
R rank. Activations are in the compute dtype (`cfg.dtype`); parameters in `cfg.param_dtype`.

The block's seven projections are of one projection kind (`colax.projections.PROJECTIONS`,
`cfg.projection`); a cross-layer kind's outputs are passed on from block to block (`Block`).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from colax import sharding
from colax.attention import causal_attention
from colax.projections import PROJECTIONS
from colax.projections.common import PROJECTION_NAMES, projection_shapes


class RMSNorm(nnx.Module):
    """RMSNorm as in Hugging Face LLaMA: normalise in fp32, cast back, scale by the weight."""

    def __init__(self, dim, cfg, *, rngs):
        del rngs
        self.eps = cfg.norm_eps
        self.weight = nnx.Param(jnp.ones((dim,), cfg.param_dtype))

    def __call__(self, x):
        """x: [..., D] -> [..., D] same dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def rotate_half(x):
    """Hugging Face "rotate half": [x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta):
    """Rotary embedding, HF convention. x: [B, T, N, H]; positions: int32 [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(emb) + rotate_half(x32) * jnp.sin(emb)).astype(x.dtype)


def attention(q, k, v, segment_ids, implementation):
    """Causal multi-head attention. q, k, v: [B, T, N, H]; segment_ids: int32 [B, T] or None.

    With segment ids, a token attends only to earlier tokens of its own segment (packed rows).
    implementation "" on the CPU backend: `colax.attention.causal_attention`; otherwise
    `jax.nn.dot_product_attention`'s ("" lets jax pick).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if not implementation and jax.default_backend() == "cpu":
        return causal_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=implementation or None)


def cached_attention(q, k, v, positions, cache, implementation):
    """Attention over a KV cache (generation). q, k, v: [B, T, N, H] for tokens at `positions`
    (int32 [B, T], < S); cache: {"k", "v"} [B, S, N, H] (k after RoPE).

    Writes k and v at their positions' slots, then each query attends to every slot at or before
    its own position. Returns (output [B, T, N, H], updated cache). The write is a one-hot product
    (exact: one term per slot) rather than a scatter, which measured slower on the CPU backend.
    """
    slots = jnp.arange(cache["k"].shape[1], dtype=positions.dtype)
    onehot = positions[:, :, None] == slots  # [B, T, S]
    written = onehot.any(axis=1)[:, :, None, None]

    def write(old, new):
        new = jnp.einsum("bts,btnh->bsnh", onehot.astype(old.dtype), new.astype(old.dtype),
                         precision=jax.lax.Precision.HIGHEST)
        return jnp.where(written, new, old)

    cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
    mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=mask, implementation=implementation or None)
    return out, cache


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)), SwiGLU MLP.

    The block input and the residual after attention are tagged "block_in" and "block_mid".
    On a mesh, q/k/v are split by heads and gate/up by mlp over "tensor"; the residual is whole.
    With a cross-layer projection kind, `first=True` builds the first block (the kind's
    `first_layer` projections) and every block returns its seven projection outputs as the carry.
    """

    def __init__(self, cfg, *, first=False, rngs):
        d = cfg.hidden_size
        kind = PROJECTIONS[cfg.projection]
        self.cross_layer = hasattr(kind, "first_layer")
        kind = kind.first_layer if first and self.cross_layer else kind
        for name, (fan_in, fan_out) in projection_shapes(d, cfg.intermediate_size).items():
            setattr(self, name, kind(fan_in, fan_out, cfg.ranks[name], cfg, rngs=rngs))
        self.attn_norm = RMSNorm(d, cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(d, cfg, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.rope_theta = cfg.rope_theta
        self.attention_impl = cfg.attention_impl
        self.only_lr_act = cfg.only_lr_act

    def __call__(self, x, positions, segment_ids, carry=None, cache=None, key=None):
        """x: [B, T, D] compute dtype; positions, segment_ids: int32 [B, T] -> (x' [B, T, D], carry').

        carry: the previous block's {projection name: output [B, T, out]} for a cross-layer kind
        (None or {} in the first block); carry' is this block's, {} for other kinds. With a KV
        `cache` ({"k", "v"} [B, S, N, H], see `cached_attention`; segment_ids unused) returns
        ((x', carry'), updated cache). `key`: a PRNG key for the projections' dropout (projection i
        gets `fold_in(key, i)`; kinds with `uses_rng`), None: none.
        """
        outputs = {}

        def project(name, h):
            proj = getattr(self, name)
            kw = {} if key is None else {"key": jax.random.fold_in(key, PROJECTION_NAMES.index(name))}
            y = proj(h, carry[name], **kw) if carry else proj(h, **kw)
            if self.cross_layer:
                outputs[name] = y
            return y

        x = checkpoint_name(sharding.constrain(x, sharding.BTD), "block_in")
        b, t, d = x.shape
        bthh = ("batch", "length", "act_heads", None)
        heads = lambda y: sharding.constrain(y.reshape(b, t, self.num_heads, d // self.num_heads), bthh)
        mlp = lambda y: sharding.constrain(y, ("batch", "length", "act_mlp"))
        residual = lambda y: sharding.constrain(y, sharding.BTD)
        h = self.attn_norm(x)
        q = apply_rope(heads(project("q", h)), positions, self.rope_theta)
        k = apply_rope(heads(project("k", h)), positions, self.rope_theta)
        v = heads(project("v", h))
        if cache is None:
            attn = attention(q, k, v, segment_ids, self.attention_impl)
        else:
            attn, cache = cached_attention(q, k, v, positions, cache, self.attention_impl)
        x = checkpoint_name(x + residual(project("o", attn.reshape(b, t, d))), "block_mid")
        h = self.mlp_norm(x)
        gate = mlp(project("gate", h))
        if not self.only_lr_act:  # with only_lr_act the gate's low-rank SiLU is the only one
            gate = jax.nn.silu(gate)
        x = x + residual(project("down", gate * mlp(project("up", h))))
        return (x, outputs) if cache is None else ((x, outputs), cache)

    def invert(self, outputs, bottlenecks):
        """The carry this block received, from the carry it returned and its projections'
        `bottleneck` values (cross-layer kinds with an `invert`): {name: [B, T, out]}."""
        return {name: getattr(self, name).invert(y, bottlenecks[name]) for name, y in outputs.items()}
