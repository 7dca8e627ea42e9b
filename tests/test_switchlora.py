"""SwitchLoRA against its authors' code (tests/official/switchlora.py, a transcription of
asfsdsf/SwitchLoRA@f9a174e): the model starts as its dense init W0; a run of updates and switches
equals the transcription's (cursor order, write-back, compensation, per-row AdamW reset and hold);
a switch keeps every layer's output; the schedule by hand; counts, recipe, and the hook through the
loop with stop-and-resume.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from colax import checkpoint, config, errors, hooks, loop, model, optim, row_adam, step
from colax.projections import common, lora, switchlora
from conftest import authors_package, small_spec
from official import switchlora as official
from test_relora import compilation_cache, losses_and_lrs, micro_relora, trainer_states  # noqa: F401 (a fixture)

ALPHA, R, HOLD = 1.0, 8, 5


def test_model_starts_as_its_dense_init():
    """At init each projection computes x W0ᵀ: W + (α / r) B A equals the W0 ~ N(0, init_std) that LoRA
    (B = 0) draws from the same key (<= 1e-6), the effective weights' std is init_std (within 3 %, 17k
    entries), and the model's logits equal those of the same model with the low-rank term merged into
    W and B zeroed (max |diff| <= 1e-5)."""
    spec = small_spec(projection="switchlora", lora_alpha=ALPHA)
    for n_in, n_out in ((32, 48), (48, 32)):
        ours = switchlora.SwitchLoRA(n_in, n_out, R, spec, rngs=nnx.Rngs(3))
        w0 = lora.LoRA(n_in, n_out, R, spec, rngs=nnx.Rngs(3)).base[...]
        merged = ours.base[...] + ours.scale * ours.lora_b[...] @ ours.lora_a[...]
        np.testing.assert_allclose(merged, w0, rtol=0, atol=1e-6)
    graphdef = nnx.graphdef(model.abstract_model(spec))
    params = nnx.to_pure_dict(nnx.state(model.Transformer(spec, rngs=nnx.Rngs(0))))
    blocks, effective = dict(params["blocks"]), []
    for name in common.PROJECTION_NAMES:
        p = blocks[name]
        w = p["base"] + ALPHA / R * jnp.einsum("lor,lri->loi", p["lora_b"], p["lora_a"])
        effective.append(np.ravel(w))
        blocks[name] = dict(p, base=w, lora_b=jnp.zeros_like(p["lora_b"]))
    assert abs(np.concatenate(effective).std() / spec.init_std - 1) < 0.03
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, spec.vocab_size)
    logits = lambda p: nnx.merge(graphdef, p)(tokens)
    assert float(jnp.abs(logits(params) - logits(dict(params, blocks=blocks))).max()) <= 1e-5


# Switches of the parity run (rank 8) per layer before update u + 1 (u = 0: before the first): layer 1
# asks for 3 before update 2 with 2 B columns still held (4 - 2 available: capped to 2), B's cursor
# wraps around (from column 7 to 0) before update 10 in both layers.
PARITY_COUNTS = {0: [1, 2], 1: [2, 3], 3: [1, 1], 9: [2, 2], 11: [1, 0]}


def projection_params(spec):
    """{"blocks": {projection: its parameters}} of a fresh SwitchLoRA model (stacked [L])."""
    params = nnx.to_pure_dict(nnx.state(model.Transformer(spec, rngs=nnx.Rngs(0))))
    return {"blocks": {name: params["blocks"][name] for name in common.PROJECTION_NAMES}}


def lora_grads(params, data):
    """Gradient of Σ_projections Σ_layers ½ |x Wᵀ + (α / r) x Aᵀ Bᵀ - t|² / N (data[name] = (x [L, N, in],
    t [L, N, out])) for A and B; zeros for every other leaf (colax.step.grads' convention)."""
    names = common.PROJECTION_NAMES

    def loss(ab):
        total = 0.0
        for name in names:
            (x, t), p = data[name], params["blocks"][name]
            low = jnp.einsum("lnr,lor->lno", jnp.einsum("lni,lri->lnr", x, ab[name]["lora_a"]), ab[name]["lora_b"])
            y = jnp.einsum("lni,loi->lno", x, p["base"]) + ALPHA / R * low
            total += 0.5 * jnp.sum((y - t) ** 2) / x.shape[1]
        return total

    g = jax.grad(loss)({n: {k: params["blocks"][n][k] for k in ("lora_a", "lora_b")} for n in names})
    return {"blocks": {n: {k: g[n].get(k, jnp.zeros_like(v)) for k, v in params["blocks"][n].items()} for n in names}}


def test_updates_and_switches_equal_the_authors_code():
    """12 updates with switches before updates 1, 2, 4, 10 and 12 (PARITY_COUNTS: a count per layer,
    one capped by `available_num`, B wrapping around), lr 0.01 with 2 warmup steps and cosine, weight
    decay 0.01, 7 projections x 2 layers, fp32: after every update W, A, B, the pools and picks, and
    at the end Adam's moments and per-row steps equal the transcription of the authors' switch step
    and StepAdamW (tests/official/switchlora.py), which switches between the backward pass and the
    step of the next update (<= 1e-5)."""
    torch = authors_package("torch")
    spec = small_spec(projection="switchlora", lora_alpha=ALPHA)
    params = projection_params(spec)
    o = optim.defaults()
    o.update(lr=0.01, warmup_steps=2, weight_decay=0.01, grad_clip=0.0, min_lr_ratio=0.0)
    steps = 12
    tx, lr = optim.make(o, steps, projection="switchlora"), optim.schedule(o, steps)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    data = {}
    for name in common.PROJECTION_NAMES:
        _, n_out, n_in = params["blocks"][name]["base"].shape
        data[name] = (rng.standard_normal((spec.num_layers, 6, n_in)).astype(np.float32),
                      0.5 * rng.standard_normal((spec.num_layers, 6, n_out)).astype(np.float32))
    t = lambda x: torch.tensor(np.asarray(x, np.float64), dtype=torch.float32)
    layers = {}
    for name in common.PROJECTION_NAMES:
        p = jax.tree.map(np.asarray, params["blocks"][name])
        w0 = p["base"].astype(np.float64) + ALPHA / R * p["lora_b"].astype(np.float64) @ p["lora_a"]
        layers[name] = [official.Layer(torch, t(w0[l]), t(p["pool_a"][l]), t(p["pool_b"][l]), R, ALPHA)
                        for l in range(spec.num_layers)]
    switch = jax.jit(switchlora.switch_layers, static_argnums=(0, 1))
    update = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(lora_grads(p, data), s, p)))
    worst = 0.0
    for u in range(steps):
        counts = PARITY_COUNTS.get(u, [0] * spec.num_layers)
        if u in PARITY_COUNTS:  # colax: the hook after step u (u = 0: before step 1)
            params, opt_state = switch(ALPHA, HOLD, {n: jnp.asarray(counts, jnp.int32) for n in common.PROJECTION_NAMES},
                                       params, opt_state)
        params, opt_state = update(params, opt_state)
        grads = []  # the authors': backward, then (switch, zero states, hold) and step
        for name in common.PROJECTION_NAMES:
            for l, layer in enumerate(layers[name]):
                a, b = layer.a.clone().requires_grad_(), layer.b.clone().requires_grad_()
                x, target = t(data[name][0][l]), t(data[name][1][l])
                y = x @ layer.w.T + layer.scaling * (x @ a.T) @ b.T
                (0.5 * ((y - target) ** 2).sum() / x.shape[0]).backward()
                grads.append((a.grad, b.grad))
        official.update(torch, [layer for name in common.PROJECTION_NAMES for layer in layers[name]], grads,
                        counts * len(common.PROJECTION_NAMES), float(lr(u)), o.b1, o.b2, o.eps, o.weight_decay, 0.0)
        for name in common.PROJECTION_NAMES:
            p = jax.tree.map(np.asarray, params["blocks"][name])
            for l, layer in enumerate(layers[name]):
                for ours, theirs in ((p["base"][l], layer.w), (p["lora_a"][l], layer.a), (p["lora_b"][l], layer.b),
                                     (p["pool_a"][l], layer.candidates_a), (p["pool_b"][l], layer.candidates_b)):
                    worst = max(worst, float(np.abs(ours - theirs.numpy()).max()))
                np.testing.assert_array_equal(p["pick_a"][l], layer.selected_a)
                np.testing.assert_array_equal(p["pick_b"][l], layer.selected_b)
        assert worst <= 1e-5, (u, worst)
    print(f"parity: max |colax - authors'| over W, A, B, pools after 12 updates: {worst:.2e}")
    adam = row_adam.find_state(opt_state)
    counts = dict(zip((hooks.param_keys(path) for path, _ in jax.tree_util.tree_leaves_with_path(adam.mu)),
                      adam.counts))
    for name in common.PROJECTION_NAMES:
        for leaf, side in (("lora_a", "a"), ("lora_b", "b")):  # counts [L, r, 1] / [L, 1, r], as the authors'
            theirs = lambda key: np.stack([layer.opt[side][key].numpy() for layer in layers[name]])
            np.testing.assert_array_equal(counts["blocks", name, leaf], theirs("step"))
            for moment, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):  # <= 1e-5 of the moment's largest entry
                ours, ref = np.asarray(getattr(adam, moment)["blocks"][name][leaf]), theirs(key)
                assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), (name, leaf, moment)
        assert np.asarray(counts["blocks", name, "lora_a"]).min() < steps  # some rows were reset


@pytest.fixture(scope="module")
def tiny():
    """(spec, graphdef, params, tx, opt_state) of a tiny SwitchLoRA model, Adam moments random (numpy)."""
    spec = small_spec(projection="switchlora", lora_alpha=ALPHA)
    graphdef = nnx.graphdef(model.abstract_model(spec))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model.Transformer(spec, rngs=nnx.Rngs(0)))))()
    o = optim.defaults()
    o.update(lr=0.01, warmup_steps=0, weight_decay=0.0)
    tx = optim.make(o, 100, projection="switchlora")
    rng = np.random.default_rng(1)
    random = lambda x: rng.standard_normal(x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else np.full(x.shape, 7, x.dtype)
    return spec, graphdef, params, tx, jax.tree.map(random, jax.eval_shape(tx.init, params))


SWITCH = jax.jit(switchlora.switch_layers, static_argnums=(0, 1))  # one compilation for both tests below
# The switch of both: 3 vectors of A and of B in every layer of every projection.
THREE = {name: jnp.full((2,), 3, jnp.int32) for name in common.PROJECTION_NAMES}


def layer_output(p, layer, x):
    """x W^T + (alpha / r) x A^T B^T of one layer of one projection, in float64."""
    w, a, b = (np.asarray(p[k][layer], np.float64) for k in ("base", "lora_a", "lora_b"))
    return x @ w.T + ALPHA / R * (x @ a.T) @ b.T


def test_switch_keeps_every_layer_output_and_writes_the_trained_vectors_back(tiny):
    """A switch (THREE): A rows 0-2 and B columns 4-6 (half a turn ahead) switch to the pool entries
    after the last one held (0-2: the init holds C - 8..C - 1), their trained values go back into the
    entries they held, every layer's output is unchanged (float64, rtol 1e-5); only the
    counterparts' (B columns 0-2, A rows 4-6) Adam moments and step counts are zeroed and held."""
    spec, graphdef, params, tx, opt_state = tiny
    params = jax.tree.map(jnp.array, params)  # a copy: the hook donates nothing, but the test edits it
    for name in common.PROJECTION_NAMES:  # "trained": A and B no longer equal the entries they hold
        p = params["blocks"][name]
        params["blocks"][name] = dict(p, lora_a=p["lora_a"] + 0.01, lora_b=p["lora_b"] - 0.01)
    old_p, old_o = jax.tree.map(np.asarray, (params, opt_state))
    new_p, new_o = SWITCH(ALPHA, HOLD, THREE, params, opt_state)
    new_p, new_o = jax.tree.map(np.asarray, (new_p, new_o))
    rows_a, rows_b = np.isin(np.arange(R), [0, 1, 2]), np.isin(np.arange(R), [4, 5, 6])
    rng = np.random.default_rng(0)
    for name in common.PROJECTION_NAMES:
        old, new = old_p["blocks"][name], new_p["blocks"][name]
        n = old["pool_a"].shape[1]
        for layer in range(spec.num_layers):
            x = rng.normal(size=(5, old["base"].shape[-1]))
            np.testing.assert_allclose(layer_output(new, layer, x), layer_output(old, layer, x), rtol=1e-5, atol=1e-5)
            assert np.abs(new["base"][layer] - old["base"][layer]).max() > 1e-3  # W did compensate
            for vectors, old_vectors, pick, pool, rows in (
                    (new["lora_a"][layer], old["lora_a"][layer], "pick_a", "pool_a", rows_a),
                    (new["lora_b"][layer].T, old["lora_b"][layer].T, "pick_b", "pool_b", rows_b)):
                np.testing.assert_array_equal(new[pick][layer][rows], [0, 1, 2])
                np.testing.assert_array_equal(vectors[rows], old[pool][layer][:3])
                np.testing.assert_array_equal(new[pool][layer][old[pick][layer][rows]], old_vectors[rows])
                np.testing.assert_array_equal(new[pick][layer][~rows], old[pick][layer][~rows])
                np.testing.assert_array_equal(vectors[~rows], old_vectors[~rows])
            assert set(old["pick_a"][layer]) == set(range(n - R, n))
    held = {"lora_a": rows_b[None, :, None], "lora_b": rows_a[None, None, :]}  # the counterparts
    (adam_old,), (adam_new,) = ([s for s in jax.tree.leaves(o, is_leaf=lambda x: isinstance(x, row_adam.ScaleByRowAdamState))
                                 if isinstance(s, row_adam.ScaleByRowAdamState)] for o in (old_o, new_o))
    paths = [hooks.param_keys(path) for path, _ in jax.tree_util.tree_leaves_with_path(adam_old.mu)]
    reset = 0
    for i, keys in enumerate(paths):
        mask = held.get(keys[-1]) if keys[0] == "blocks" else None
        for old, new, zero in ((adam_old.counts[i], adam_new.counts[i], 0), (adam_old.holds[i], adam_new.holds[i], HOLD)):
            np.testing.assert_array_equal(new, old if mask is None else np.where(mask, zero, old))
        for moment in ("mu", "nu"):
            old, new = (jax.tree.leaves(getattr(a, moment))[i] for a in (adam_old, adam_new))
            np.testing.assert_array_equal(new, old if mask is None else np.where(mask, 0, old))
        reset += mask is not None
    assert reset == 2 * len(common.PROJECTION_NAMES)  # A and B of every projection


def test_counterparts_get_no_update_for_exactly_5_steps(tiny):
    """A switch after step 1 (A rows 0-2, B columns 4-6): B columns 0-2 and A rows 4-6 are held in
    steps 2-6, trained again from step 7 (their gradients zeroed by the optimizer after clipping,
    `row_adam.reset(..., hold=5)`; weight decay 0)."""
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
        if s == 1:
            params, opt_state = SWITCH(ALPHA, HOLD, THREE, params, opt_state)
    assert held == {1: False, 2: True, 3: True, 4: True, 5: True, 6: True, 7: False, 8: False, 9: False}


def test_switch_rates_by_hand_and_the_hook_before_every_update():
    """Rank 64, interval 40, 100 steps, descent 0.1: before update u + 1 each layer switches 1.6 *
    0.3^((u + 1) / 10) vectors in expectation (1.4185, 1.2576, ... from u = 0), equal to the transcription
    of `_get_switch_replace_num`'s r / interval (1e-12); the hook is due before every update, the
    first included (s = 0), and not after the last."""
    rates = switchlora.switch_rates(64, 40, 0.1, 100)
    want = [64 / (40 / 0.3 ** ((u + 1) / 10)) for u in range(100)]
    np.testing.assert_allclose(rates, want, rtol=1e-12)
    np.testing.assert_allclose(rates, [64 / (40 / official.get_switch_rate(u, 0.1 * 100)) for u in range(100)],
                               rtol=1e-12)
    assert rates[0] == pytest.approx(1.4185, abs=1e-4) and rates[1] == pytest.approx(1.2576, abs=1e-4)
    cfg = config.preset("switchlora", "tiny")
    cfg.model.update(rank=64, hidden_size=128, intermediate_size=256, num_heads=4)
    cfg.train.steps = 100
    hook = switchlora.SwitchLoRA.hook(cfg)
    assert [s for s in range(-1, 102) if hook.due(s)] == list(range(100))


@pytest.mark.parametrize("rate", [0.37, 2.3])
def test_switch_counts_are_the_authors_stochastic_rounding(rate):
    """Per layer, floor(rate) or floor(rate) + 1, the latter with probability rate - floor(rate), as the
    transcription of `_get_switch_replace_num` (seeded numpy draws, 20k layers each): both give only
    those two values, each share of the larger (so the mean) within 4.5 sigma of the fraction, the
    two within 4.5 sigma of each other; layers draw independently."""
    n, frac, whole = 20_000, rate - math.floor(rate), math.floor(rate)
    ours = np.asarray(jax.jit(switchlora.draw_counts, static_argnums=2)(jax.random.key(0), jnp.float32(rate), n))
    interval = 64 / rate  # r = 64: r / interval = rate
    random = np.random.RandomState(0)
    theirs = np.array([official.get_switch_replace_num(random, 64, 0, interval * 0.3 ** (1 / 10), 10)
                       for _ in range(n)])  # global_step 0, descent step 10: rate_0 = 0.3^0.1 cancels
    sigma = math.sqrt(frac * (1 - frac) / n)
    for counts in (ours, theirs):
        assert set(np.unique(counts)) == {whole, whole + 1}
        assert abs(np.mean(counts == whole + 1) - frac) <= 4.5 * sigma
    assert abs(np.mean(ours == whole + 1) - np.mean(theirs == whole + 1)) <= 4.5 * math.sqrt(2) * sigma
    assert len(set(ours[:8].tolist())) > 1  # independent per layer


@pytest.mark.parametrize("n_in, n_out, rank", [(32, 48, 8), (48, 32, 8), (512, 512, 128), (512, 1376, 128),
                                               (1376, 512, 128), (2048, 5461, 512)])
def test_switch_bounds_equal_the_authors_formula(n_in, n_out, rank):
    """`switch_bounds` against the transcription of `lora_utils.get_init_lora_bound` (its torch gain), 1e-12."""
    torch = authors_package("torch")
    np.testing.assert_allclose(switchlora.switch_bounds(n_in, n_out, rank),
                               official.get_init_lora_bound(torch, n_in, n_out, rank), rtol=1e-12)


def test_trainer_switches_before_the_first_update():
    """Through `trainer.Trainer` (rank 8, interval 10, descent 10: about 0.8 vectors a layer a step):
    after step s every layer's cursor (read off its picks) has moved by the counts that layer drew
    at the hooks 0, 1, ..., s (`draw_counts` with the hook's key folded with the projection's index):
    the switch before step 1 included, the layers' counts their own."""
    cfg = config.preset("switchlora", "tiny")
    cfg.model.update(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, rank=8,
                     dtype="float32", switch_interval=10, switch_descent=10.0)
    cfg.train.update(steps=4, batch_size=4, micro_batch_size=4)
    cfg.optim.warmup_steps = 1
    states = trainer_states(cfg)
    rates = switchlora.switch_rates(8, 10, 10.0, 4)
    drawn = np.array([[switchlora.draw_counts(jax.random.fold_in(hooks.hook_key(cfg.train.seed, s), i),
                                              jnp.float32(rates[s]), 2) for i in range(7)] for s in range(4)])
    assert drawn[0].any() and not np.all(drawn[0] == drawn[0, 0, 0])  # a switch before step 1, per layer
    for s in range(1, 5):
        for i, name in enumerate(common.PROJECTION_NAMES):
            p = states[s][0]["blocks"][name]
            cursor = np.asarray(switchlora.cursor(jnp.asarray(p["pick_a"]), p["pool_a"].shape[1]))
            # after step 4 the hooks 0-3: none after the last step
            np.testing.assert_array_equal(cursor, drawn[:s + 1, i].sum(0) % 8, err_msg=f"{name} after step {s}")


def test_more_switches_a_step_than_free_candidates_is_a_config_error():
    cfg = config.preset("switchlora", "tiny")
    cfg.model.update(rank=120, switch_interval=1, switch_hold_steps=0)  # ~115 a step; min(128, 344) - 120 = 8 free
    with pytest.raises(errors.ConfigError, match=r"model.switch_interval=1: up to \d+ vectors of the q projection"):
        switchlora.SwitchLoRA.hook(cfg)
    cfg.model.rank = 32  # the preset's: at most 1 a step
    assert switchlora.SwitchLoRA.hook(cfg) is not None


def test_switchlora_recipe_counts_and_pool_bytes_by_hand():
    """The authors' recipe (run_switchlora_350m.sh): lr 0.02, warmup 100, clip 1.0, no weight decay,
    cosine to 0, alpha 1, interval 40, hold 5; at 350m 40k steps of 1152 x 512 tokens."""
    for size in ("60m", "130m", "350m", "1b"):
        cfg = config.from_file(f"configs/switchlora_{size}.py")
        assert cfg == config.preset("switchlora", size) and cfg.model.projection == "switchlora"
        assert (cfg.model.lora_alpha, cfg.model.switch_interval, cfg.model.switch_hold_steps) == (1.0, 40, 5)
        o = cfg.optim
        assert (o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.min_lr_ratio) == (0.02, 100, 1.0, 0.0, 0.0)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len) == (100_000, 512, 256)  # 1b: the size's
    cfg = config.preset("switchlora", "350m")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len, cfg.model.rank) == (40_000, 1152, 512, 256)
    spec = config.validate(config.preset("switchlora", "60m"))
    d, f, v, n_layers, r = 512, 1376, 32000, 8, 128
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    counts = model.count_params(spec)
    other = 2 * v * d + 2 * n_layers * d + d
    assert counts["total"] == other + n_layers * sum(i * o + r * (i + o) for i, o in shapes)  # pools not counted
    assert counts["trainable"] == other + n_layers * sum(r * (i + o) for i, o in shapes)
    assert counts["state"] == n_layers * sum(min(i, o) * (i + o) for i, o in shapes)  # 2 pools of min(i, o)


def test_pure_bf16_preset_keeps_the_pools_in_bf16():
    """`config.preset(..., pure_bf16=True)`: the authors' `--dtype bfloat16` run, the recipe otherwise
    the same; W, A, B and the pools in bfloat16."""
    cfg, plain = config.preset("switchlora", "tiny", pure_bf16=True), config.preset("switchlora", "tiny")
    assert (cfg.model.dtype, cfg.model.param_dtype, plain.model.param_dtype) == ("bfloat16", "bfloat16", "float32")
    plain.model.param_dtype = "bfloat16"
    assert cfg == plain
    spec = config.validate(cfg)
    leaves = nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))["blocks"]["q"]
    assert {k: leaves[k].dtype for k in ("base", "lora_a", "lora_b", "pool_a", "pool_b")} == dict.fromkeys(
        ("base", "lora_a", "lora_b", "pool_a", "pool_b"), jnp.bfloat16)


def test_switchlora_run_switches_and_resumes_with_identical_losses(compilation_cache, tmp_path_factory):  # noqa: F811
    """Rank 8, interval 10, descent 10 (rate about 1): about 0.8 switches a layer a step, drawn per
    layer from the hook's key (the picks change at some steps, by the checkpoints); stopped after
    step 3 and resumed, the losses equal the uninterrupted run's (the holds and per-row counts live in
    the checkpointed optimizer state, the cursors in the picks, the draws in the step's key)."""
    cfg = micro_relora(tmp_path_factory)
    cfg.model.update(projection="switchlora", lora_alpha=ALPHA, switch_interval=10, switch_descent=10.0,
                     lora_dropout=0.0)
    cfg.optim.update(schedule="cosine", full_rank_steps=0, restart_every=0, warmup_steps=0)
    cfg.train.steps = 6
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, _ = losses_and_lrs(full)
    picks = [np.asarray(checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]["pick_a"]) for s in steps]
    assert [s for s in steps[1:] if not np.array_equal(picks[s - 1], picks[s - 2])]
    assert loop.run(cfg, parts, stop_after=3) is None
    loop.run(cfg, parts)
    assert losses_and_lrs(parts)[0] == steps
    np.testing.assert_allclose(losses_and_lrs(parts)[1], losses, rtol=1e-6)
