"""Frozen parameters: what a projection kind names in `frozen`, and integer leaves, are never
differentiated, get no optimizer state and are left unchanged by training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from colax import checkpoint, config, model, optim, projections, row_adam, sharding, state, step
from conftest import adam_state, small_spec


class FrozenBase(nnx.Module):
    """y = x @ (base + delta): `base` frozen, `delta` trained, `support` an integer leaf."""
    frozen = ("base",)

    def __init__(self, in_features, out_features, rank, cfg, *, rngs):
        del rank
        self.base = nnx.Param(0.1 * jax.random.normal(rngs.params(), (in_features, out_features)))
        self.delta = nnx.Param(0.1 * jax.random.normal(rngs.params(), (in_features, out_features)))
        self.support = nnx.Param(jnp.arange(3, dtype=jnp.int32))

    def __call__(self, x):
        return x @ (self.base[...] + self.delta[...]).astype(x.dtype)

    flops_per_token = staticmethod(lambda i, o, r: 2 * i * o)
    param_axes = staticmethod(lambda i, o: {"base": (i, o), "delta": (i, o), "support": (None,)})


@pytest.fixture
def frozen_setup(monkeypatch):
    monkeypatch.setitem(projections.PROJECTIONS, "frozen_base", FrozenBase)
    cfg = config.preset("cola", "tiny")
    cfg.model.update(projection="frozen_base", vocab_size=64, hidden_size=16, intermediate_size=32,
                     num_heads=2, num_layers=2, rank=4, dtype="float32")
    cfg.optim.update(lr=0.1, warmup_steps=0, weight_decay=0.1)
    spec = model.spec_from_config(cfg.model)
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tokens = jax.random.randint(jax.random.key(1), (1, 2, 8), 0, 64)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, -1), loss_mask=jnp.ones(tokens.shape))
    return cfg, graphdef, params, batch


def test_frozen_and_integer_leaves_are_not_trained(frozen_setup):
    cfg, graphdef, params, batch = frozen_setup
    mask = model.trainable_mask(params)
    assert not mask["blocks"]["q"]["base"] and not mask["blocks"]["q"]["support"]
    assert mask["blocks"]["q"]["delta"] and mask["embed"] and mask["blocks"]["attn_norm"]["weight"]
    # base and delta enter the loss the same way: their true gradients (of the token-mean loss,
    # 16 tokens here) are equal and nonzero.
    loss_fn = lambda p: step.loss_sums(p, graphdef, jax.tree.map(lambda x: x[0], batch))[0]
    true_base = jax.grad(lambda b: loss_fn({**params, "blocks": {**params["blocks"], "q": {
        **params["blocks"]["q"], "base": b}}}))(params["blocks"]["q"]["base"])
    true_base = true_base / batch["loss_mask"].sum()
    assert float(jnp.abs(true_base).max()) > 0
    _, g = step.grads(params, graphdef, batch)
    np.testing.assert_allclose(g["blocks"]["q"]["delta"], true_base, rtol=1e-5, atol=1e-7)
    assert not np.any(g["blocks"]["q"]["base"]) and not np.any(g["blocks"]["q"]["support"])

    tx = optim.make(cfg.optim, 10)
    opt_state = tx.init(params)
    adam = adam_state(opt_state)
    assert isinstance(adam, optax.ScaleByAdamState)  # optax's own: SLTrain asks for no per-vector counts
    assert isinstance(adam.mu["blocks"]["q"]["base"], optax.MaskedNode)
    assert adam.mu["blocks"]["q"]["delta"].shape == params["blocks"]["q"]["delta"].shape
    train_step = jax.jit(step.make_train_step(graphdef, tx))
    new = params
    for _ in range(3):
        new, opt_state, _ = train_step(new, opt_state, batch)
    for name in ("base", "support"):
        np.testing.assert_array_equal(new["blocks"]["q"][name], params["blocks"]["q"][name])
    assert new["blocks"]["q"]["support"].dtype == jnp.int32
    assert not np.allclose(new["blocks"]["q"]["delta"], params["blocks"]["q"]["delta"])


def test_pure_bf16_step_returns_the_state_dtypes_it_was_given():
    """Pure bf16 (param_dtype bfloat16): the step's gradients are float32, so the AdamW moments are
    float32 from init, and a step's output params and optimizer state have the input's dtypes
    (else the jitted step compiles a second time for step 2, and a checkpoint's moments would not
    match the restore target). The params stay bf16."""
    cfg = config.preset("cola", "tiny")
    cfg.model.update(vocab_size=64, hidden_size=16, intermediate_size=32, num_heads=2, num_layers=2, rank=4,
                     dtype="bfloat16", param_dtype="bfloat16")
    spec = model.spec_from_config(cfg.model)
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    tx = optim.make(cfg.optim, cfg.train.steps)
    opt_state = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (1, 2, 8), 0, 64)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, -1), loss_mask=jnp.ones(tokens.shape))
    new = jax.jit(step.make_train_step(graphdef, tx))(params, opt_state, batch)[:2]
    dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]
    assert dtypes(new) == dtypes((params, opt_state))
    assert set(dtypes(params)) == {jnp.dtype(jnp.bfloat16)}
    assert jnp.dtype(jnp.float32) in dtypes(opt_state)


@pytest.mark.parametrize("projection, adam_type", [("cola", optax.ScaleByAdamState),
                                                   ("switchlora", row_adam.ScaleByRowAdamState)])
def test_adamw_state_is_optax_unless_the_kind_asks_for_vector_counts_and_restores(projection, adam_type, tmp_path):
    """AdamW keeps `optax.scale_by_adam`'s state where the projection kind asks for no per-vector step
    counts (CoLA) and `row_adam`'s where it does (SwitchLoRA's `vector_steps`); a checkpoint of either,
    after two steps, restores (`checkpoint.restore` onto `state.abstract_state`) to the same state, and
    the step from it equals the uninterrupted run's."""
    spec = small_spec(projection=projection, lora_alpha=1.0)
    o = optim.defaults()
    o.update(lr=1e-2, warmup_steps=0)
    tx = optim.make(o, 10, projection=projection)
    mesh = sharding.make_mesh(config.defaults().mesh)
    graphdef, params, opt_state = state.init_state(spec, tx, mesh, seed=0)
    assert isinstance(adam_state(opt_state), adam_type)
    train = jax.jit(step.make_train_step(graphdef, tx))
    tokens = jax.random.randint(jax.random.key(1), (3, 1, 2, 8), 0, spec.vocab_size)
    batch = lambda i: dict(inputs=tokens[i], targets=jnp.roll(tokens[i], -1, -1), loss_mask=jnp.ones(tokens[i].shape))
    for i in range(2):
        params, opt_state = train(params, opt_state, batch(i))[:2]
    mngr = checkpoint.manager(tmp_path, config.train_defaults(), owner=True)
    checkpoint.save(mngr, 2, params, opt_state)
    checkpoint.check_saves(mngr, wait=True)
    s, restored_params, restored_state, _ = checkpoint.restore(mngr, lambda s: state.abstract_state(spec, tx, mesh))
    assert s == 2 and isinstance(adam_state(restored_state), adam_type)
    assert jax.tree.structure(restored_state) == jax.tree.structure(opt_state)
    jax.tree.map(np.testing.assert_array_equal, (restored_params, restored_state), (params, opt_state))
    after = train(restored_params, restored_state, batch(2))[:2]
    jax.tree.map(np.testing.assert_array_equal, after, train(params, opt_state, batch(2))[:2])
