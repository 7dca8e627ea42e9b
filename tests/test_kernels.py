"""The Pallas CoLA kernels, Triton (`Blocks`) and Mosaic (`TpuBlocks`), in interpret mode on CPU
against the plain-jnp reference. tests/test_tpu_compile.py compiles the Mosaic one for TPUs."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import AxisType

from colax import remat
from colax.errors import ConfigError
from colax import kernels
from colax.kernels import Blocks, TpuBlocks, cola_matmul, cola_reference, silu_matmul_sharded

SMALL = Blocks(block_n=16, block_out=16, block_r=16)  # several ragged tiles at test sizes
TPU_SMALL = TpuBlocks(block_n=8, block_out=128)  # the smallest Mosaic tiles: ragged N; O > 128 ragged too
BOTH = pytest.mark.parametrize("blocks", [SMALL, TPU_SMALL], ids=["triton", "mosaic"])


def _inputs(n, r, d_in, d_out, dtype=jnp.float32, seed=0):
    kx, ka, kb, kw = jax.random.split(jax.random.key(seed), 4)
    std = (r * (d_in + d_out)) ** -0.25
    x = jax.random.normal(kx, (n, d_in), dtype)
    a = (std * jax.random.normal(ka, (d_in, r))).astype(dtype)
    b = (std * jax.random.normal(kb, (r, d_out))).astype(dtype)
    w = jax.random.normal(kw, (n, d_out), dtype)  # cotangent: loss = sum(y * w)
    return x, a, b, w


def _value_and_grads(fn, x, a, b, w):
    """(y, (dx, dA, dB)) of y = fn(x, A, B) for the cotangent w, in one jitted call."""
    def run(x, a, b, w):
        y, vjp = jax.vjp(fn, x, a, b)
        return y, vjp(w)

    return jax.jit(run)(x, a, b, w)


def _pallas(x, a, b, blocks=SMALL):
    return cola_matmul(x, a, b, kernel="pallas", interpret=True, blocks=blocks)


def _reference(x, a, b):
    return cola_reference(x, a, b)[0]


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@BOTH
@pytest.mark.parametrize("n,r,d_in,d_out", [(37, 8, 16, 48), (64, 16, 48, 16), (100, 32, 48, 48),
                                            (100, 8, 16, 16), (37, 16, 48, 48), (37, 16, 48, 300)])
def test_fp32_values_and_grads_match_reference(n, r, d_in, d_out, blocks):
    x, a, b, w = _inputs(n, r, d_in, d_out)
    got = jax.tree.leaves(_value_and_grads(lambda x, a, b: _pallas(x, a, b, blocks), x, a, b, w))
    want = jax.tree.leaves(_value_and_grads(_reference, x, a, b, w))
    for g, t in zip(got, want):
        np.testing.assert_allclose(g, t, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(t))))


@BOTH
def test_bf16_error_no_worse_than_bf16_reference(blocks):
    x, a, b, w = _inputs(100, 32, 48, 300, jnp.bfloat16)
    exact = jax.tree.leaves(_value_and_grads(_reference, *(v.astype(jnp.float32) for v in (x, a, b, w))))
    kernel = jax.tree.leaves(_value_and_grads(lambda x, a, b: _pallas(x, a, b, blocks), x, a, b, w))
    ref_bf16 = jax.tree.leaves(_value_and_grads(_reference, x, a, b, w))
    for k, r, e in zip(kernel, ref_bf16, exact):
        assert k.dtype == jnp.bfloat16
        assert _rel_err(k, e) <= 1.5 * _rel_err(r, e), (_rel_err(k, e), _rel_err(r, e))


def test_xla_kernel_is_the_reference():
    x, a, b, _ = _inputs(12, 8, 16, 24)
    np.testing.assert_array_equal(cola_matmul(x, a, b, kernel="xla"), _reference(x, a, b))


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="the error is for CPU backends")
def test_pallas_without_gpu_is_a_one_line_config_error():
    x, a, b, _ = _inputs(12, 8, 16, 24)
    msg = f"model.kernel='pallas' needs a GPU or a TPU (found {jax.default_backend()}); use 'xla'"
    with pytest.raises(ConfigError, match=f"^{msg}$".replace("(", r"\(").replace(")", r"\)")):
        cola_matmul(x, a, b, kernel="pallas")
    with pytest.raises(ConfigError, match="model.kernel must be one of"):
        cola_matmul(x, a, b, kernel="triton")


@BOTH
def test_cola_m_saves_only_z(capsys, blocks):
    """Under the "cola_m" policy the kernel path keeps the inputs and the [N, R] z, nothing else."""
    x, a, b, w = _inputs(37, 8, 16, 48)
    f = jax.checkpoint(lambda x, a, b, w: jnp.sum(_pallas(jnp.cos(x), a, b, blocks) * w),
                       policy=remat.POLICIES["cola_m"].policy)
    print_saved_residuals(f, x, a, b, w)
    saved = capsys.readouterr().out.strip().splitlines()
    assert len(saved) == 5 and all("from the argument" in s for s in saved[:4]), saved
    assert saved[4].startswith("f32[37,8] named 'cola_z'"), saved


@BOTH
def test_shard_map_wrapper_matches_unsharded(blocks):
    x, a, b, w = _inputs(2 * 19, 8, 16, 48)
    x = x.reshape(2, 19, 16)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharded = lambda x, a, b: silu_matmul_sharded(x @ a, b, mesh, ("data", "fsdp"), blocks, interpret=True)
    got = jax.tree.leaves(_value_and_grads(sharded, x, a, b, w.reshape(2, 19, 48)))
    want = jax.tree.leaves(_value_and_grads(_reference, x, a, b, w.reshape(2, 19, 48)))
    for g, t in zip(got, want):
        np.testing.assert_allclose(g, t, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(t))))


_FOUR_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from colax.kernels import Blocks, cola_matmul, cola_reference
    k = jax.random.split(jax.random.key(0), 4)
    x, a, b, w = (jax.random.normal(k[0], (8, 5, 16)), 0.2 * jax.random.normal(k[1], (16, 8)),
                  0.2 * jax.random.normal(k[2], (8, 24)), jax.random.normal(k[3], (8, 5, 24)))
    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda x, a, b: jnp.sum(fn(x, a, b) * w), argnums=(0, 1, 2)))(x, a, b)
    pallas = lambda x, a, b: cola_matmul(x, a, b, kernel="pallas", interpret=True, blocks=Blocks(16, 16, 16))
    want = grads(lambda x, a, b: cola_reference(x, a, b)[0])
    with jax.set_mesh(jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)):
        assert "shard_map" in str(jax.make_jaxpr(pallas)(x, a, b))
        got = grads(pallas)
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, t, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(t))))
    print("ok")
""")


def test_shard_map_on_four_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_target_platform_picks_the_kernel(monkeypatch):
    """model.kernel="pallas" runs the target platform's kernel: Mosaic for a TPU (`colax.plan
    --topology` compiles for one on a CPU host), Triton otherwise."""
    from colax.kernels import cola_pallas, cola_pallas_tpu

    ran = []
    for module, name in ((cola_pallas, "silu_matmul_fwd_kernel"), (cola_pallas_tpu, "silu_matmul_fwd_tpu")):
        monkeypatch.setattr(module, name, lambda z, b, *args, name=name, f=getattr(module, name): (
            ran.append(name), f(z, b, *args))[1])
    z, b = jnp.ones((16, 8)), jnp.ones((8, 128))
    pallas = lambda: lambda z, b: kernels.silu_matmul_any(z, b, kernel="pallas", interpret=True)  # a fresh
    # function each time: jax's tracing cache does not know the target platform
    assert kernels.default_blocks() == Blocks()
    jax.make_jaxpr(pallas())(z, b)
    with kernels.compiling_for("tpu"):
        assert kernels.default_blocks() == TpuBlocks() and kernels.target_platform() == "tpu"
        jax.make_jaxpr(pallas())(z, b)
        kernels.check_kernel("pallas")  # no ConfigError: a TPU can run it
    assert ran == ["silu_matmul_fwd_kernel", "silu_matmul_fwd_tpu"]


def test_tpu_blocks_off_mosaic_tiles_are_an_error():
    with pytest.raises(ValueError, match=r"^TpuBlocks: block_n=12 must be a multiple of 8 and block_out=128"):
        TpuBlocks(block_n=12, block_out=128)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("policy", ["none", "cola_m"])
def test_model_with_pallas_kernel_matches_xla(monkeypatch, policy, platform):
    from flax import nnx

    from colax import model, step
    from colax.kernels import cola_pallas
    from conftest import small_spec

    monkeypatch.setattr(cola_pallas, "INTERPRET", True)
    xla = small_spec(remat=policy)
    net = model.Transformer(xla, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    pallas_graphdef = nnx.graphdef(model.Transformer(small_spec(remat=policy, kernel="pallas"), rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, xla.vocab_size)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, axis=1), loss_mask=jnp.ones(tokens.shape))
    want = jax.value_and_grad(lambda p: step.loss_sums(p, graphdef, batch)[0])(params)
    with kernels.compiling_for(platform):  # Triton's kernel or Mosaic's (interpret mode)
        got = jax.value_and_grad(lambda p: step.loss_sums(p, pallas_graphdef, batch)[0])(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)
