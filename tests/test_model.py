"""The model against plain-jnp references written here from the paper's and LLaMA's math."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colax import layers, model
from colax.projections import cola
from conftest import small_spec

TOL = dict(rtol=2e-5, atol=2e-5)


def init(spec, seed=0):
    return model.Transformer(spec, rngs=nnx.Rngs(seed))


def test_cola_block_is_silu_xa_times_b(spec):
    proj = cola.CoLA(32, 48, 8, spec, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (3, 5, 32))
    a, b = np.asarray(proj.A[...]), np.asarray(proj.B[...])
    xa = np.asarray(x) @ a
    expected = (xa / (1.0 + np.exp(-xa))) @ b
    chex.assert_shape(proj(x), (3, 5, 48))
    np.testing.assert_allclose(proj(x), expected, **TOL)


@pytest.mark.parametrize("fan_in,fan_out,rank", [(512, 512, 128), (512, 1376, 128), (2048, 5461, 512)])
def test_cola_init_statistics(spec, fan_in, fan_out, rank):
    proj = cola.CoLA(fan_in, fan_out, rank, spec, rngs=nnx.Rngs(0))
    want = (rank * (fan_in + fan_out)) ** -0.25
    for w in (proj.A[...], proj.B[...]):
        assert abs(float(jnp.std(w)) / want - 1) < 0.02
        assert abs(float(jnp.mean(w))) < 0.02 * want


def test_full_rank_and_embedding_init_statistics():
    net = init(small_spec(projection="dense", hidden_size=256, intermediate_size=512, vocab_size=512, rank=0))
    for w in (net.embed[...], net.lm_head[...], net.blocks.q.w[...], net.blocks.down.w[...]):
        assert abs(float(jnp.std(w)) / 0.02 - 1) < 0.02
    np.testing.assert_array_equal(net.blocks.attn_norm.weight[...], 1.0)


def test_layers_are_stacked_and_distinct(spec):
    net = init(spec)
    chex.assert_shape(net.blocks.q.A[...], (spec.num_layers, 32, 8))
    assert not np.allclose(net.blocks.q.A[...][0], net.blocks.q.A[...][1])


def test_ranks_per_projection_kind():
    net = init(small_spec(ranks=dict(q=4, down=16)))
    chex.assert_shape(net.blocks.q.A[...], (2, 32, 4))
    chex.assert_shape(net.blocks.k.A[...], (2, 32, 8))
    chex.assert_shape(net.blocks.down.B[...], (2, 16, 32))


# ---------------------------------------------------------------- independent reference forward


def ref_rope(x, pos, theta=10000.0):
    """HF rotate-half RoPE written per channel pair (j, j + H/2) with explicit angles."""
    h = x.shape[-1]
    half = h // 2
    out = np.empty_like(x)
    for j in range(half):
        angle = pos[..., None] / theta ** (2 * j / h)  # [B, T, 1]
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[..., j], x[..., j + half]  # [B, T, N]
        out[..., j] = a * c - b * s
        out[..., j + half] = b * c + a * s
    return out


def ref_forward(p, tokens, spec, positions=None, segments=None):
    """The LLaMA / CoLA / CR-Net decoder in numpy float64, from the math, one block at a time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    bsz, t = tokens.shape
    nh, d = spec.num_heads, spec.hidden_size
    hd = d // nh
    pos = np.broadcast_to(np.arange(t), (bsz, t)) if positions is None else np.asarray(positions)
    silu = lambda z: z / (1 + np.exp(-z))

    def norm(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.norm_eps)

    prev, outputs = {}, {}  # CR-Net: the previous block's projection outputs, this block's

    def proj(blk, name, x):
        if "w" in blk[name]:  # full-rank: dense, and CR-Net's block 1
            y = x @ blk[name]["w"]
        elif "beta" in blk[name]:  # CR-Net: s(beta) * previous block's output + x A B
            beta = blk[name]["beta"]
            y = np.sign(beta) * (np.abs(beta) + 1e-6) * prev[name] + x @ blk[name]["A"] @ blk[name]["B"]
        else:
            y = silu(x @ blk[name]["A"]) @ blk[name]["B"]
        outputs[name] = y
        return y

    allowed = np.tril(np.ones((t, t), bool))[None]
    if segments is not None:
        s = np.asarray(segments)
        allowed = allowed & (s[:, :, None] == s[:, None, :])
    x = p["embed"][tokens]
    first = [p["first_block"]] if "first_block" in p else []  # CR-Net's block 1 is stored apart
    for blk in first + [jax.tree.map(lambda a: a[i], p["blocks"]) for i in range(spec.num_layers - len(first))]:
        prev, outputs = outputs, {}
        h = norm(x, blk["attn_norm"]["weight"])
        q, k, v = (proj(blk, n, h).reshape(bsz, t, nh, hd) for n in ("q", "k", "v"))
        q, k = ref_rope(q, pos), ref_rope(k, pos)
        scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(hd)
        scores = np.where(allowed[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(bsz, t, d)
        x = x + proj(blk, "o", attn)
        h = norm(x, blk["mlp_norm"]["weight"])
        gate = proj(blk, "gate", h)
        gate = gate if spec.only_lr_act else silu(gate)
        x = x + proj(blk, "down", gate * proj(blk, "up", h))
    return norm(x, p["final_norm"]["weight"]) @ p["lm_head"]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(only_lr_act=True),
    dict(scan_layers=False),
    dict(projection="dense", rank=0),
])
def test_forward_matches_reference(overrides):
    spec = small_spec(**overrides)
    net = init(spec)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, spec.vocab_size)
    got = net(tokens)
    chex.assert_shape(got, (2, 12, spec.vocab_size))
    chex.assert_type(got, jnp.float32)
    want = ref_forward(nnx.to_pure_dict(nnx.state(net)), np.asarray(tokens), spec)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_packed_segments_match_reference_and_separate_documents(spec):
    net = init(spec)
    tokens = jax.random.randint(jax.random.key(4), (1, 10), 0, spec.vocab_size)
    segments = jnp.array([[1] * 4 + [2] * 6])
    positions = jnp.array([list(range(4)) + list(range(6))])
    got = net(tokens, positions, segments)
    want = ref_forward(nnx.to_pure_dict(nnx.state(net)), np.asarray(tokens), spec, positions, segments)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # The second document alone gives the same logits as inside the packed row.
    np.testing.assert_allclose(got[:, 4:], net(tokens[:, 4:]), rtol=1e-5, atol=1e-5)


def test_causal(spec):
    net = init(spec)
    tokens = jax.random.randint(jax.random.key(5), (1, 16), 0, spec.vocab_size)
    t = 7
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % spec.vocab_size)
    a, b = net(tokens), net(changed)
    np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_bf16_compute_close_to_fp32():
    spec32 = small_spec()
    net = init(spec32)
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 0, spec32.vocab_size)
    state = nnx.state(net)
    net16 = nnx.merge(nnx.graphdef(init(small_spec(dtype="bfloat16"))), state)
    got, want = net16(tokens), net(tokens)
    chex.assert_type(got, jnp.float32)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want))) + 0.02


def test_pure_bf16_params():
    net = init(small_spec(dtype="bfloat16", param_dtype="bfloat16"))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(net)))
    assert bool(jnp.isfinite(net(jnp.zeros((1, 4), jnp.int32))).all())


def test_rope_is_rotate_half_convention():
    x = jax.random.normal(jax.random.key(7), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    np.testing.assert_allclose(layers.apply_rope(x, pos, 10000.0), ref_rope(np.asarray(x), np.asarray(pos)),
                               rtol=1e-5, atol=1e-5)


def test_rmsnorm_default_eps_is_llamas():
    # Rows whose mean square (1e-6) is the size of LLaMA's eps = 1e-6: y = x / sqrt(2e-6), so a
    # different default eps (1e-5, 1e-8) moves the output by far more than the tolerance.
    x = np.full((2, 32), 1e-3, np.float32)
    norm = layers.RMSNorm(32, model.spec_from_config(model.defaults()).replace(dtype=jnp.float32),
                          rngs=nnx.Rngs(0))
    np.testing.assert_allclose(norm(jnp.asarray(x)), x / np.sqrt(1e-6 + 1e-6), rtol=1e-5)


def test_rmsnorm_bf16_normalises_in_fp32():
    # The bf16 output equals the fp32 RMSNorm of the same (bf16) inputs rounded to bf16, within one
    # bf16 ulp (2^(exponent - 7)); normalising in bf16 instead is off by 2 ulps on these inputs.
    spec = small_spec(hidden_size=256, intermediate_size=512, dtype="bfloat16")
    norm = layers.RMSNorm(256, spec, rngs=nnx.Rngs(0))
    norm.weight[...] = 1 + 0.1 * jax.random.normal(jax.random.key(1), (256,))
    x = jax.random.normal(jax.random.key(0), (64, 256)).astype(jnp.bfloat16)
    x32, w = np.asarray(x, np.float32), np.asarray(norm.weight[...].astype(jnp.bfloat16), np.float32)
    y = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + spec.norm_eps)
    ref = np.asarray(jnp.asarray(w * np.asarray(jnp.asarray(y).astype(jnp.bfloat16), np.float32)).astype(jnp.bfloat16),
                     np.float32)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    ulp = 2.0 ** (np.floor(np.log2(np.abs(ref))) - 7)
    assert (np.abs(np.asarray(out, np.float32) - ref) / ulp).max() <= 1.0
