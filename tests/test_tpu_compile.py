"""Compiled by libtpu for TPU topologies on this machine (no TPU): `colax.plan --topology`'s
training step, and the Mosaic CoLA kernel.

Each compile runs in a subprocess with its own environment (JAX_PLATFORMS=cpu for the host,
`plan.TPU_ENV` for libtpu), so the suite's own backend is whatever it was. Skips in one line where
libtpu (the `tpu` extra) is not installed. Wall time on a 2-core machine beside a running test
suite: 60-85 s the tiny step's test (its compile 36-40 s), 18 s the kernel's, 10 s the slices'
(jax 0.10.2, libtpu 0.0.42.1); all three 160 s on jax 0.12.0.1, libtpu 0.0.50.1.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import extra_package

extra_package("libtpu", "tpu")

from colax import config, model, plan  # noqa: E402

_TINY_FSDP4 = textwrap.dedent("""
    import json
    from colax import config, plan, sharding, state, optim, model
    cfg = config.from_file("configs/tiny.py")
    cfg.train.micro_batch_size = 8  # 32 rows = 8 a chip: one micro-batch
    cfg.mesh.update(data=1, fsdp=4)
    p = plan.tpu_plan(cfg, "v5e:2x2", estimate=False)
    # The same model data-parallel (fsdp=1), from its shardings only (no compile).
    cfg.mesh.update(data=4, fsdp=1)
    mesh = sharding.make_mesh(cfg.mesh, plan.topology_devices("v5e:2x2"))
    params, _ = state.abstract_state(config.validate(cfg, 4), optim.make(cfg.optim, cfg.train.steps), mesh)
    p["data4_param_bytes"] = plan.per_chip_bytes(params)
    print(json.dumps(p))
""")


def _run(script, timeout=300):
    """The stdout of `script` run by this Python with the CPU as its backend and libtpu quiet."""
    env = dict(os.environ, **plan.TPU_ENV, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_tiny_step_on_v5e_per_chip_bytes_follow_the_sharding():
    p = json.loads(_run(_TINY_FSDP4).strip().splitlines()[-1])
    spec = config.validate(config.from_file("configs/tiny.py"))
    total = model.count_params(spec)["total"] * 4  # fp32 parameters
    norms = (2 * spec.num_layers + 1) * spec.hidden_size * 4  # RMSNorm weights: no fsdp axis, whole on every chip
    assert (p["chips"], p["device_kind"], p["mesh"]) == (4, "TPU v5 lite", dict(data=1, fsdp=4, tensor=1))
    # fsdp=4: every matrix has a d or r axis split 4 ways, so a chip holds a quarter of them.
    assert p["param_bytes"] == (total - norms) // 4 + norms
    assert p["data4_param_bytes"] == total  # fsdp=1: all of them
    # AdamW's two moments mirror the parameters (plus step counts, replicated: under 1 KiB).
    assert 2 * p["param_bytes"] <= p["optimizer_bytes"] <= 2 * p["param_bytes"] + 1024
    # The compiler's own figure: the step's arguments are the state and the batch, each chip's shard
    # (the batch: 5 int32/float32 [1, 32, 128] arrays with packing, split 4 ways), plus the padding of
    # TPU tiles ((8, 128) a tile: a [d / 4 = 32, r = 32] shard fills a quarter of one; measured +20 %
    # at tiny's sizes, +0.7 % data-parallel), and about a quarter of the data-parallel state (3 x total).
    state_and_batch = p["param_bytes"] + p["optimizer_bytes"] + 5 * 32 * 128 * 4 // 4
    assert state_and_batch <= p["memory"]["argument_bytes"] <= 1.25 * state_and_batch
    assert p["memory"]["argument_bytes"] < 0.35 * 3 * total
    assert p["fits"] and p["memory"]["total_bytes"] < 2**30
    # FSDP gathers the weights for the forward and backward and reduce-scatters their gradients.
    assert p["collectives"]["all-gather"]["bytes"] > 0, p["collectives"]
    assert p["compile_seconds"] < 120


_KERNEL_AOT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from colax import kernels, plan
    for topology in ("v5e:2x2", "v5p:2x2x1"):
        devices = plan.topology_devices(topology)
        mesh = jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                             devices=devices)
        rows, whole = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
        x = jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16, sharding=rows)
        a = jax.ShapeDtypeStruct((512, 128), jnp.bfloat16, sharding=whole)
        b = jax.ShapeDtypeStruct((128, 1376), jnp.bfloat16, sharding=whole)
        def loss(x, a, b):  # traced inside compiling_for: kernel "pallas" is the Mosaic one
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return jnp.sum(kernels.cola_matmul(x, a, b, kernel="pallas").astype(jnp.float32) ** 2)
        with kernels.compiling_for("tpu"):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b).compile()
        hlo = compiled.as_text()
        print(topology, hlo.count('custom_call_target="tpu_custom_call"'), "cola_silu_matmul_tpu" in hlo)
""")


def test_mosaic_kernel_compiles_for_v5e_and_v5p():
    """The Mosaic kernel under shard_map, with its custom_vjp's backward, compiled AOT: one Mosaic
    custom call per chip program (the forward; the backward is XLA's)."""
    out = _run(_KERNEL_AOT)
    assert out.split("\n")[:2] == ["v5e:2x2 1 True", "v5p:2x2x1 1 True"], out


_TWO_SLICES = textwrap.dedent("""
    from colax import config, plan, sharding
    from colax.errors import ConfigError
    cfg = config.from_file("configs/tiny.py")
    cfg.mesh.update(data=-1, fsdp=2)
    mesh = sharding.make_mesh(cfg.mesh, plan.topology_devices("v5e:2x2", num_slices=2))
    print(dict(mesh.shape), [[d.slice_index for d in row.flat] for row in mesh.devices])
    cfg.mesh.update(data=1, fsdp=-1)
    try:
        sharding.make_mesh(cfg.mesh, plan.topology_devices("v5e:2x2", num_slices=2))
    except ConfigError as e:
        print(e)
""")


def test_two_slices_put_the_data_axis_across_slices():
    """--num_slices 2: each slice holds half of the data axis whole (fsdp and tensor stay in a slice)."""
    shape, error = _run(_TWO_SLICES).strip().splitlines()
    assert shape == "{'data': 4, 'fsdp': 2, 'tensor': 1} [[0, 0], [0, 0], [1, 1], [1, 1]]"
    assert error == "mesh.data=1 must be a multiple of the 2 slices (data parallelism spans the slices)"
