"""Sharding tests on 8 simulated CPU devices; run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the rest of the suite keeps one device)."""

import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from colax import hooks, model, optim, sharding, state, step
from colax.projections import lora, switchlora
from colax.errors import ConfigError
from conftest import adam_state, small_spec

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import collectives  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
BATCH, SEQ = 8, 16


def spec_for(projection, **kw):
    """d=64, 8 heads, rank 16, intermediate 128, vocab 256, 2 layers, fp32."""
    dims = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=8, rank=16)
    return small_spec(projection=projection, **{**dims, **kw})


def mesh_of(shape):
    cfg = ml_collections.ConfigDict(dict(zip(sharding.AXES, shape)))
    return sharding.make_mesh(cfg, jax.devices()[:int(np.prod(shape))])


def make_tx():
    o = optim.defaults()
    o.update(lr=1e-2, warmup_steps=1)
    return optim.make(o, 10)


def batches(seed, accum=1):
    """A [accum, BATCH, SEQ] stack of random next-token batches."""
    tokens = np.random.default_rng(seed).integers(0, 256, (accum, BATCH, SEQ + 1), dtype=np.int32)
    return dict(inputs=tokens[..., :-1], targets=tokens[..., 1:], loss_mask=np.ones((accum, BATCH, SEQ), np.float32))


@functools.cache
def initial_params(projection):
    """Parameters and graphdef initialised on one device."""
    graphdef, params, _ = state.init_state(spec_for(projection), make_tx(), mesh_of((1, 1, 1)), seed=0)
    return graphdef, jax.device_get(params)


@functools.cache
def loss_and_grads(projection, shape):
    """(loss, grads as numpy, collective bytes of the compiled function) on a mesh of `shape`."""
    mesh = mesh_of(shape)
    graphdef, params = initial_params(projection)
    shardings = state.tree_shardings(params, mesh)
    fn = jax.jit(sharding.on_mesh(lambda p, b: step.grads(p, graphdef, b), mesh),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(NamedSharding(mesh, P()), shardings))
    compiled = fn.lower(params, batches(0)).compile()
    loss, grads = jax.device_get(compiled(jax.device_put(params, shardings), batches(0)))
    return loss, grads, collectives.collective_bytes(compiled.as_text())


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("projection,shape", [(p, s) for p in ("cola", "dense") for s in MESHES]
                         + [("sltrain", (1, 8, 1)), ("sltrain", (2, 2, 2)), ("crnet", (2, 2, 2))])
def test_loss_and_grads_match_one_device(projection, shape):
    loss, grads, _ = loss_and_grads(projection, shape)
    ref_loss, ref_grads, _ = loss_and_grads(projection, (1, 1, 1))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)




def test_sltrain_support_and_values_split_over_fsdp():
    """SLTrain's index and values (and the values' Adam moments) are split over fsdp; index has no Adam state."""
    mesh = mesh_of((2, 2, 2))
    params, opt_state = state.abstract_state(spec_for("sltrain"), make_tx(), mesh)
    adam = adam_state(opt_state)
    for name in ("q", "down"):
        for leaf in (params["blocks"][name]["index"], params["blocks"][name]["values"],
                     adam.mu["blocks"][name]["values"], adam.nu["blocks"][name]["values"]):
            assert leaf.sharding.spec == P(None, "fsdp"), (name, leaf.sharding)
        assert isinstance(adam.mu["blocks"][name]["index"], optax.MaskedNode)


def test_shardings_follow_the_rules():
    mesh = mesh_of((2, 2, 2))
    params, opt_state = state.abstract_state(spec_for("cola"), make_tx(), mesh)
    want = {("embed",): P("tensor", "fsdp"), ("lm_head",): P("fsdp", "tensor"),
            ("final_norm", "weight"): P(None), ("blocks", "attn_norm", "weight"): P(None, None),
            ("blocks", "q", "A"): P(None, "fsdp", None), ("blocks", "q", "B"): P(None, "fsdp", "tensor"),
            ("blocks", "o", "A"): P(None, "tensor", "fsdp"), ("blocks", "o", "B"): P(None, "fsdp", None),
            ("blocks", "up", "B"): P(None, "fsdp", "tensor"), ("blocks", "down", "A"): P(None, "tensor", "fsdp")}
    adam = adam_state(opt_state)
    for keys, spec in want.items():
        for tree in (params, adam.mu, adam.nu):
            leaf = functools.reduce(lambda t, k: t[k], keys, tree)
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (keys, leaf.sharding)
    assert adam.count.sharding.is_fully_replicated  # optax's Adam: CoLA asks for no per-vector counts


def test_dense_shardings_are_megatron():
    mesh = mesh_of((1, 2, 4))
    abstract, _ = state.abstract_state(spec_for("dense"), make_tx(), mesh)
    for name, spec in (("q", P(None, "fsdp", "tensor")), ("o", P(None, "tensor", "fsdp")),
                       ("down", P(None, "tensor", "fsdp"))):
        assert abstract["blocks"][name]["w"].sharding.spec == spec


def argument_bytes(shape):
    mesh = mesh_of(shape)
    tx = make_tx()
    spec = spec_for("cola")
    params, opt_state = state.abstract_state(spec, tx, mesh)
    graphdef = nnx.graphdef(model.abstract_model(spec))
    train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches(0))
    return train.lower(params, opt_state, batch).compile().memory_analysis().argument_size_in_bytes


def test_memory_per_device_falls_with_fsdp():
    sizes = [argument_bytes(s) for s in [(8, 1, 1), (2, 4, 1), (1, 8, 1)]]
    assert sizes[0] > sizes[1] > sizes[2], sizes


def run_steps(train, params, opt_state, mesh, seeds):
    losses = []
    for seed in seeds:
        params, opt_state, metrics = train(params, opt_state, sharding.global_batch(batches(seed), mesh))
        losses.append(float(metrics["loss"]))
    return params, opt_state, losses


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    spec, tx = spec_for("cola"), make_tx()
    mesh = mesh_of((8, 1, 1))
    graphdef, params, opt_state = state.init_state(spec, tx, mesh, seed=0)
    for path, leaf in jax.tree_util.tree_leaves_with_path((params, opt_state)):
        assert leaf.sharding.is_equivalent_to(state.param_sharding(path, leaf, mesh), leaf.ndim)
    train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
    params, opt_state, _ = run_steps(train, params, opt_state, mesh, [1, 2])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", (params, opt_state))
    _, _, uninterrupted = run_steps(train, params, opt_state, mesh, [3, 4])

    mesh2 = mesh_of((2, 2, 2))
    target = state.abstract_state(spec, tx, mesh2)
    with ocp.StandardCheckpointer() as ckpt:
        params2, opt_state2 = ckpt.restore(tmp_path / "ckpt", target)
    assert params2["blocks"]["q"]["B"].sharding.spec == P(None, "fsdp", "tensor")
    train2 = state.jit_train_step(step.make_train_step(graphdef, tx), params2, opt_state2, mesh2)
    _, _, resumed = run_steps(train2, params2, opt_state2, mesh2, [3, 4])
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)


def test_impossible_meshes_are_config_errors():
    with pytest.raises(ConfigError, match="data\\*fsdp\\*tensor = 4 but there are 8 devices"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)))
    with pytest.raises(ConfigError, match="mesh.tensor=8 must divide model.num_heads=4"):
        state.validate(spec_for("cola", num_heads=4), mesh_of((1, 1, 8)))
    with pytest.raises(ConfigError, match="size 12\\) is not divisible by fsdp=8"):
        state.validate(spec_for("cola", rank=12), mesh_of((1, 8, 1)))
    with pytest.raises(ConfigError, match="batch of 12 rows is not divisible by mesh data\\*fsdp=8"):
        state.validate(spec_for("cola"), mesh_of((4, 2, 1)), batch_size=12)


def test_cola_moves_fewer_bytes_than_full_rank():
    moved = {p: sum(loss_and_grads(p, (1, 1, 8))[2].values()) for p in ("cola", "dense")}
    assert 0 < moved["cola"] < moved["dense"], moved


def svd_batches(hlo):
    """The batch size of every SVD custom call in compiled HLO text (its first output's leading dim)."""
    return [int(m) for m in re.findall(r"= \(f32\[(\d+),\d+,\d+\][^\n]*custom-call\([^\n]*/svd", hlo)]


def q_projector(opt_state):
    """GaLore's projector of the q weights (a device array)."""
    return next(x for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
                if "projector" in jax.tree_util.keystr(path) and "'q'" in jax.tree_util.keystr(path))


def test_galore_on_fsdp_and_tensor_matches_one_device_and_splits_the_svd_by_layer():
    """One device: the refresh (T = 2: counts 0 and 2) runs inside one compiled step. Mesh
    (1, 2, 2): the 2 layers do not divide over fsdp*tensor = 4, so each SVD batch is split over
    fsdp alone (1 layer per device); losses and parameters as on one device."""
    o = optim.defaults()
    o.update(lr=1e-2, warmup_steps=1, name="galore", rank=8, update_proj_gap=2)
    tx, spec = optim.make(o, 10), spec_for("dense")
    results = {}
    for shape in [(1, 1, 1), (1, 2, 2)]:
        mesh = mesh_of(shape)
        graphdef, params, opt_state = state.init_state(spec, tx, mesh, seed=0)
        train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
        if shape != (1, 1, 1):
            train = train.lower(params, opt_state, sharding.global_batch(batches(0), mesh)).compile()
        losses, projectors = [], []
        for seed in [1, 2, 3, 4]:
            params, opt_state, metrics = train(params, opt_state, sharding.global_batch(batches(seed), mesh))
            losses.append(float(metrics["loss"]))
            projectors.append(np.array(q_projector(opt_state)))  # a copy: the state is donated
        results[shape] = losses, jax.device_get(params), projectors, train
    (ref_losses, ref_params, ref_projectors, ref_train), (losses, params, _, compiled) = results.values()
    assert ref_train._cache_size() == 1  # one compilation for refresh and ordinary steps
    assert [not np.array_equal(a, b) for a, b in zip(ref_projectors, ref_projectors[1:])] == [False, True, False]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Adam amplifies the all-reduce's rounding differences in near-zero gradients (embeddings): 4e-5.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, ref_params)
    assert svd_batches(compiled.as_text()) == [1] * 7  # q, k, v, o, gate, up, down: one layer per device
    assert q_projector(opt_state).sharding.spec == P(None, "fsdp", None)  # (layers, embed, opt_rank)


def hook_on_meshes(apply, trained, shapes):
    """[(params, opt_state)] after the hook `apply` at step 1, jitted by `state.jit_hook` on each mesh
    shape from the host state `trained`; asserts every leaf keeps its sharding."""
    results = []
    for shape in shapes:
        mesh = mesh_of(shape)
        params, opt_state = jax.device_put(trained, state.tree_shardings(trained, mesh))
        where = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        params, opt_state = state.jit_hook(apply, params, opt_state, mesh)(
            jnp.int32(1), params, opt_state, hooks.hook_key(0, 1))
        assert jax.tree.map(lambda x: x.sharding, (params, opt_state)) == where
        results.append(jax.device_get((params, opt_state)))
    return results


def test_relora_hook_on_fsdp_and_tensor_matches_one_device_and_keeps_the_shardings():
    """The ReLoRA merge (keep 10% of A's and B's moments) jitted by `state.jit_hook` on a (1, 2, 2)
    mesh, from the state after one step on one device: the same parameters and optimizer state as
    the hook gives on one device, every leaf where it was."""
    o = optim.defaults()
    o.update(lr=1e-2, warmup_steps=0)
    tx, spec = optim.make(o, 10), spec_for("lora")
    mesh = mesh_of((1, 1, 1))
    graphdef, params, opt_state = state.init_state(spec, tx, mesh, seed=0)
    train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
    trained = jax.device_get(train(params, opt_state, sharding.global_batch(batches(1), mesh))[:2])  # B != 0
    apply = functools.partial(lora.relora_merge, spec.lora_alpha, 0.1)
    results = hook_on_meshes(apply, trained, [(1, 1, 1), (1, 2, 2)])
    assert np.abs(results[0][0]["blocks"]["q"]["base"] - trained[0]["blocks"]["q"]["base"]).max() > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), results[1], results[0])


def test_switchlora_switch_on_meshes_matches_one_device_and_keeps_the_shardings():
    """A SwitchLoRA switch (2 A rows and 2 B columns of every projection: write-back into the pools,
    W compensated, counterparts' Adam state reset) jitted by `state.jit_hook` on (1, 2, 2) and
    (2, 2, 2) meshes from the state after one step: the one-device result, every leaf where it was."""
    o = optim.defaults()
    o.update(lr=1e-2, warmup_steps=0)
    tx, spec = optim.make(o, 10, projection="switchlora"), spec_for("switchlora", lora_alpha=1.0)
    adam = adam_state(state.abstract_state(spec, tx, mesh_of((2, 2, 2)))[1])  # per-vector counts: replicated
    assert all(c.sharding.is_fully_replicated for c in adam.counts + adam.holds)
    mesh = mesh_of((1, 1, 1))
    graphdef, params, opt_state = state.init_state(spec, tx, mesh, seed=0)
    train = state.jit_train_step(step.make_train_step(graphdef, tx), params, opt_state, mesh)
    trained = jax.device_get(train(params, opt_state, sharding.global_batch(batches(1), mesh))[:2])
    counts = {name: jnp.full((spec.num_layers,), 2, jnp.int32) for name in switchlora.PROJECTION_NAMES}
    apply = lambda step, params, opt_state, key: switchlora.switch_layers(1.0, 5, counts, params, opt_state)
    results = hook_on_meshes(apply, trained, [(1, 1, 1), (1, 2, 2), (2, 2, 2)])
    assert not np.array_equal(results[0][0]["blocks"]["q"]["pool_a"], trained[0]["blocks"]["q"]["pool_a"])
    for other in results[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), other, results[0])
