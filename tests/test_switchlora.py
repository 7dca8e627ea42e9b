"""SwitchLoRA: a switch keeps every layer's output, counterparts held 5 steps, the schedule by hand,
counts, and the hook through the loop with stop-and-resume.

References are written here in numpy from the paper's formulas (Zhou & Wang, arXiv 2406.06564).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colax import checkpoint, config, errors, loop, model, optim, step
from colax.projections import common, switchlora
from conftest import small_spec
from test_relora import compilation_cache, losses_and_lrs, micro_relora  # noqa: F401 (a fixture)

ALPHA, R, HOLD = 1.0, 8, 5


@pytest.fixture(scope="module")
def tiny():
    """(spec, graphdef, params, tx, opt_state) of a tiny SwitchLoRA model, Adam moments random (numpy)."""
    spec = small_spec(projection="switchlora", lora_alpha=ALPHA)
    graphdef = nnx.graphdef(model.abstract_model(spec))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model.Transformer(spec, rngs=nnx.Rngs(0)))))()
    o = optim.defaults()
    o.update(lr=0.01, warmup_steps=0, weight_decay=0.0)
    tx = optim.make(o, 100)
    rng = np.random.default_rng(1)
    random = lambda x: rng.standard_normal(x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, x.dtype)
    return spec, graphdef, params, tx, jax.tree.map(random, jax.eval_shape(tx.init, params))


SWITCH = jax.jit(switchlora.switchlora_switch, static_argnums=(0, 1))  # one compilation for both tests below
# The hand-made switch table of both (cumulative switches after each step): 3 vectors after step 1.
TABLE = {R: jnp.asarray([0, 3] + [3] * 10, jnp.int32)}


def layer_output(p, layer, x):
    """x W^T + (alpha / r) x A^T B^T of one layer of one projection, in float64."""
    w, a, b = (np.asarray(p[k][layer], np.float64) for k in ("base", "lora_a", "lora_b"))
    return x @ w.T + ALPHA / R * (x @ a.T) @ b.T


def test_switch_keeps_every_layer_output_and_resets_exactly_the_switched_state(tiny):
    """After step 1 (TABLE) A rows 0-2 and B columns 4-6 (half a turn ahead) switch."""
    spec, graphdef, params, tx, opt_state = tiny
    params = jax.tree.map(jnp.array, params)  # a copy: the hook donates nothing, but the test edits it
    for name in common.PROJECTION_NAMES:  # countdowns running from before: they drop by one
        params["blocks"][name]["hold_a"] = params["blocks"][name]["hold_a"].at[:, 7].set(2)
        params["blocks"][name]["hold_b"] = params["blocks"][name]["hold_b"].at[:, 3].set(1)
    old_p, old_o = jax.tree.map(np.asarray, (params, opt_state))
    new_p, new_o = SWITCH(ALPHA, HOLD, TABLE, jnp.int32(1), params, opt_state, jax.random.key(7))
    new_p, new_o = jax.tree.map(np.asarray, (new_p, new_o))
    rows_a, rows_b = np.isin(np.arange(R), [0, 1, 2]), np.isin(np.arange(R), [4, 5, 6])
    rng = np.random.default_rng(0)
    for name in common.PROJECTION_NAMES:
        old, new = old_p["blocks"][name], new_p["blocks"][name]
        for layer in range(spec.num_layers):
            x = rng.normal(size=(5, old["base"].shape[-1]))
            np.testing.assert_allclose(layer_output(new, layer, x), layer_output(old, layer, x), rtol=1e-5, atol=1e-5)
            assert np.abs(new["base"][layer] - old["base"][layer]).max() > 1e-3  # W did compensate
            for vectors, pick, pool, rows in ((new["lora_a"][layer], "pick_a", "pool_a", rows_a),
                                              (new["lora_b"][layer].T, "pick_b", "pool_b", rows_b)):
                taken = new[pick][layer][rows]
                assert len(set(taken)) == 3 and not set(taken) & set(old[pick][layer])  # free entries only
                np.testing.assert_array_equal(vectors[rows], new[pool][layer][taken])
                np.testing.assert_array_equal(new[pick][layer][~rows], old[pick][layer][~rows])
            np.testing.assert_array_equal(new["lora_a"][layer][~rows_a], old["lora_a"][layer][~rows_a])
            np.testing.assert_array_equal(new["lora_b"][layer][:, ~rows_b], old["lora_b"][layer][:, ~rows_b])
        np.testing.assert_array_equal(new["hold_b"], [[5, 5, 5, 0, 0, 0, 0, 0]] * 2)  # counterparts of A's
        np.testing.assert_array_equal(new["hold_a"], [[0, 0, 0, 0, 5, 5, 5, 1]] * 2)
        np.testing.assert_array_equal(new["pool_a"], old["pool_a"])
    touched = rows_a | rows_b  # a switched vector and its counterpart: Adam moments zeroed
    reset = 0
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(old_o), jax.tree.leaves(new_o), strict=True):
        leaf = getattr(path[-1], "key", None)
        if leaf in ("lora_a", "lora_b"):
            kept = old.copy()
            if leaf == "lora_a":
                kept[:, touched] = 0
            else:
                kept[:, :, touched] = 0
            np.testing.assert_array_equal(new, kept)
            reset += 1
        else:
            np.testing.assert_array_equal(new, old)
    assert reset == 2 * 2 * len(common.PROJECTION_NAMES)  # mu and nu of A and B of every projection


def test_counterparts_get_no_update_for_exactly_5_steps(tiny):
    """A switch after step 1 (A rows 0-2, B columns 4-6): B columns 0-2 and A rows 4-6 are held in
    steps 2-6, trained again from step 7. Their Adam moments are zeroed at the switch, so a held
    vector's update is zero exactly when every gradient since the switch was zero (weight decay 0)."""
    spec, graphdef, params, tx, _ = tiny
    opt_state = jax.jit(tx.init)(params)
    train_step = jax.jit(step.make_train_step(graphdef, tx))
    tokens = jax.random.randint(jax.random.key(3), (1, 4, 17), 0, spec.vocab_size)
    batch = dict(inputs=tokens[..., :-1], targets=tokens[..., 1:], loss_mask=jnp.ones((1, 4, 16), jnp.int32))
    held = {}
    for s in range(1, 10):
        before = jax.tree.map(np.asarray, params["blocks"]["up"])
        params, opt_state, _ = train_step(params, opt_state, batch)
        after = params["blocks"]["up"]
        frozen_b = np.array_equal(after["lora_b"][:, :, :3], before["lora_b"][:, :, :3])
        frozen_a = np.array_equal(after["lora_a"][:, 4:7], before["lora_a"][:, 4:7])
        assert frozen_a == frozen_b
        held[s] = frozen_a
        assert not np.array_equal(after["lora_b"][:, :, 3:], before["lora_b"][:, :, 3:])  # the rest trains
        params, opt_state = SWITCH(ALPHA, HOLD, TABLE, jnp.int32(s), params, opt_state, jax.random.key(s))
    assert held == {1: False, 2: True, 3: True, 4: True, 5: True, 6: True, 7: False, 8: False, 9: False}


def test_switch_schedule_by_hand():
    """Rank 64, interval 40, 100 steps, descent 0.1: step t switches 1.6 * 0.3^((t + 1) / 10) vectors
    in expectation; the running sum is floored. By hand: 1.257, 2.373, 3.361, 4.238, 5.014 after steps 1-5."""
    table = switchlora.switch_schedule(64, 40, 0.1, 100)
    assert list(table[:6]) == [0, 1, 2, 3, 4, 5]
    total, want = 0.0, [0]
    for t in range(1, 101):
        total += 64 / (40 / 0.3 ** ((t + 1) / (0.1 * 100)))
        want.append(math.floor(total))
    assert list(table) == want
    # closed form 1.6 q^2 (1 - q^s) / (1 - q), q = 0.3^0.1 = 0.88657: 10.089 (s = 20), 10.997 (40), 11.087 (100)
    assert (table[20], table[40], table[100]) == (10, 10, 11)
    cfg = config.preset("switchlora", "tiny")
    cfg.model.update(rank=64, hidden_size=128, intermediate_size=256, num_heads=4)
    cfg.train.steps = 100
    hook = switchlora.SwitchLoRA.hook(cfg)
    switched = [s for s in range(1, 101) if table[s] > table[s - 1]]
    # due after each switch and the HOLD steps after it (the countdowns), never otherwise
    assert [s for s in range(1, 101) if hook.due(s)] == sorted({t + k for t in switched for k in range(HOLD + 1)
                                                               if t + k <= 100})


def test_more_switches_a_step_than_free_candidates_is_a_config_error():
    cfg = config.preset("switchlora", "tiny")
    cfg.model.update(rank=120, switch_interval=1, switch_hold_steps=0)  # ~115 a step; min(128, 344) - 120 = 8 free
    with pytest.raises(errors.ConfigError, match=r"model.switch_interval=1: up to \d+ vectors of the q projection"):
        switchlora.SwitchLoRA.hook(cfg)
    cfg.model.rank = 32  # the preset's: at most 1 a step
    assert switchlora.SwitchLoRA.hook(cfg) is not None


def test_switchlora_counts_and_pool_bytes_by_hand():
    for size in ("60m", "130m", "350m", "1b"):
        cfg = config.from_file(f"configs/switchlora_{size}.py")
        assert cfg == config.preset("switchlora", size) and cfg.model.projection == "switchlora"
        assert (cfg.model.lora_alpha, cfg.model.switch_interval, cfg.model.switch_hold_steps) == (1.0, 40, 5)
    spec = config.validate(config.preset("switchlora", "60m"))
    d, f, v, n_layers, r = 512, 1376, 32000, 8, 128
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    counts = model.count_params(spec)
    other = 2 * v * d + 2 * n_layers * d + d
    assert counts["total"] == other + n_layers * sum(i * o + r * (i + o) for i, o in shapes)  # pools not counted
    assert counts["trainable"] == other + n_layers * sum(r * (i + o) for i, o in shapes)
    assert counts["state"] == n_layers * sum(min(i, o) * (i + o) for i, o in shapes)  # 2 pools of min(i, o)


def test_switchlora_run_switches_and_resumes_with_identical_losses(compilation_cache, tmp_path_factory):  # noqa: F811
    """Rank 8, interval 10, descent 10 (rate about 1): 0.8 switches a step, so the hook switches or
    counts down after every step (switches after steps 2, 3, 5, 6 and, by the checkpoints, at no other step);
    stopped after step 3 and resumed, the losses equal the uninterrupted run's."""
    cfg = micro_relora(tmp_path_factory)
    cfg.model.update(projection="switchlora", lora_alpha=ALPHA, switch_interval=10, switch_descent=10.0)
    cfg.optim.update(schedule="cosine", full_rank_steps=0, restart_every=0)
    cfg.train.steps = 6
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, _ = losses_and_lrs(full)
    table = switchlora.switch_schedule(8, 10, 10.0, 6)
    picks = [np.asarray(checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]["pick_a"]) for s in steps]
    changed = [s for s in steps[1:] if not np.array_equal(picks[s - 1], picks[s - 2])]
    assert changed == [s for s in steps[1:] if table[s] > table[s - 1]] == [2, 3, 5, 6]  # cumulative 0.77, 1.52, 2.26, 2.98, 3.69, 4.39
    assert loop.run(cfg, parts, stop_after=3) is None
    loop.run(cfg, parts)
    assert losses_and_lrs(parts)[0] == steps
    np.testing.assert_allclose(losses_and_lrs(parts)[1], losses, rtol=1e-6)
