"""LoRA / ReLoRA: the layer, the merge-and-reinit hook, the jagged cosine, and the hook through the loop.

The schedule, the merge / reset order and the warm start's switch are checked against a transcription of
the authors' code (tests/official/relora.py, Guitaricet/relora); the layer and the merge against numpy
written here from the papers' formulas (Hu et al. 2021, Lialin et al., ICLR 2024).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from colax import checkpoint, config, data, loop, model, optim, schedules, sharding, state, tokenizer, trainer
from colax.projections import common, lora
from conftest import small_spec
from official import relora as official

ALPHA = 32.0


def test_lora_layer_is_xwt_plus_scaled_xatbt():
    spec = small_spec(projection="lora")
    proj = lora.LoRA(32, 48, 8, spec, rngs=nnx.Rngs(1))
    w, a = np.asarray(proj.base[...]), np.asarray(proj.lora_a[...])
    assert w.shape == (48, 32) and a.shape == (8, 32) and proj.lora_b[...].shape == (48, 8)
    assert not np.any(np.asarray(proj.lora_b[...]))  # B = 0: the layer starts as x W^T
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    b = np.asarray(jax.random.normal(jax.random.key(3), (48, 8)))
    proj.lora_b[...] = b
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 32)))
    expected = x @ w.T + (ALPHA / 8) * (x @ a.T) @ b.T
    np.testing.assert_allclose(proj(jnp.asarray(x)), expected, rtol=2e-5, atol=2e-5)


def test_lora_dropout_drops_the_low_rank_input_in_training_only():
    """torch's nn.Dropout(p) on the input of the low-rank term only (ReLoRaLinear.forward): x Wᵀ +
    (α/r) (m ⊙ x / (1 - p)) Aᵀ Bᵀ with m the key's Bernoulli(1 - p) mask; no key (evaluation,
    generation): none. Through the model: a key changes the logits, the same key reproduces them."""
    spec = small_spec(projection="lora", lora_dropout=0.25)
    proj = lora.LoRA(32, 48, 8, spec, rngs=nnx.Rngs(1))
    proj.lora_b[...] = jax.random.normal(jax.random.key(3), (48, 8))
    w, a, b = (np.asarray(p[...]) for p in (proj.base, proj.lora_a, proj.lora_b))
    x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 32)))
    key = jax.random.key(4)
    keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))
    assert 0.2 < 1 - keep.mean() < 0.3
    low = lambda x_low: x @ w.T + (ALPHA / 8) * (x_low @ a.T) @ b.T
    np.testing.assert_allclose(proj(jnp.asarray(x), key), low(np.where(keep, x / 0.75, 0)), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(proj(jnp.asarray(x)), low(x), rtol=2e-5, atol=2e-5)
    assert model.uses_rng(spec) and not model.uses_rng(small_spec(projection="lora"))
    net = model.Transformer(spec, rngs=nnx.Rngs(0))
    net.blocks.up.lora_b[...] = jax.random.normal(jax.random.key(6), net.blocks.up.lora_b.shape)  # B = 0 at init
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, spec.vocab_size)
    assert not np.allclose(net(tokens, key=key), net(tokens))
    np.testing.assert_array_equal(net(tokens, key=key), net(tokens, key=key))
    m = config.preset("switchlora", "tiny").model
    m.lora_dropout = 0.1
    with pytest.raises(config.ConfigError, match="model.lora_dropout needs model.projection='lora'"):
        model.spec_from_config(m)


def optim_section(**kw):
    o = optim.defaults()
    o.update(dict(dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="jagged_cosine"), **kw))
    return o


# (train.steps, full_rank_steps, restart_every, warmup_steps, restart_warmup_steps, full_rank_warmup_steps)
LAYOUTS = [(100, 20, 20, 5, 5, 10), (100, 0, 25, 10, 5, 0), (120, 30, 30, 0, 30, 40),
           (20_000, 5000, 5000, 500, 100, 1000)]


@pytest.mark.parametrize("total,warm,every,warmup,rewarm,warm_warmup", LAYOUTS)
def test_lr_of_every_update_and_the_merges_equal_the_official_runs(total, warm, every, warmup, rewarm, warm_warmup):
    """colax's lr of every update (`optim.lr`, the loop's metrics) and its merge steps
    (`schedules.is_merge`) against the transcription of the authors' two runs (tests/official/relora.py),
    through the warm start, the fresh scheduler after it and several restarts; the last layout is the
    README's 250M recipe (colax's 130M relora preset). fp32 schedule: 1e-5 relative (measured 1.7e-6)."""
    o = optim_section(lr=1e-3, full_rank_lr=5e-4, full_rank_steps=warm, restart_every=every, warmup_steps=warmup,
                      restart_warmup_steps=rewarm, full_rank_warmup_steps=warm_warmup)
    want, events = official.run(num_training_steps=total, warm_start_steps=warm, warm_start_lr=5e-4,
                                warm_start_warmup=warm_warmup, lr=1e-3, warmup_steps=warmup, relora=every,
                                restart_warmup_steps=rewarm, min_lr_ratio=0.1)
    stride = max(1, total // 500)  # every update of the short layouts, every 40th (and each restart's) at 20k
    counts = sorted(set(range(0, total, stride)) | {warm + k * every + d for k in range(total // every)
                                                     for d in (-1, 0, 1, rewarm - 1, rewarm)} & set(range(total)))
    got = np.array([optim.lr(o, total, c) for c in counts])
    np.testing.assert_allclose(got, np.array(want)[counts], rtol=1e-5, atol=1e-12)
    merges = [u for u, what in events if what == "merge"]
    assert len(merges) >= 2 and [s for s in range(1, total + 1) if schedules.is_merge(o, s)] == merges
    assert all(want[u - 1] == 0 for u in merges)  # each merge follows an update at lr 0


def trainer_states(cfg):
    """[(params, opt_state) as numpy after optimizer step s for s = 0..train.steps] of `trainer.Trainer`
    on random token batches [1, 4, 16]."""
    spec = config.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    tr = trainer.Trainer(cfg, nnx.graphdef(model.abstract_model(spec)), mesh)
    assert tr.rng == (cfg.model.lora_dropout > 0)  # each step gets its dropout key
    _, params, opt_state = state.init_state(spec, tr.tx(0), mesh, cfg.train.seed)
    states = [jax.tree.map(np.array, (params, opt_state))]
    for s in range(1, cfg.train.steps + 1):
        tokens = jax.random.randint(jax.random.key(s), (1, 4, 17), 0, spec.vocab_size)
        batch = dict(inputs=tokens[..., :-1], targets=tokens[..., 1:], loss_mask=jnp.ones((1, 4, 16), jnp.float32))
        params, opt_state, _ = tr(s, params, opt_state, batch)
        states.append(jax.tree.map(np.array, (params, opt_state)))
    return states


def tiny_relora(**model):
    """A tiny ReLoRA: 12 steps, a warm start of 3, restarts every 3 low-rank steps (merges after 7, 10)."""
    cfg = config.preset("relora", "tiny")
    cfg.model.update(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, rank=8,
                     dtype="float32", **model)
    cfg.optim.update(lr=0.01, full_rank_lr=0.005, warmup_steps=1, full_rank_warmup_steps=1, full_rank_steps=3,
                     restart_every=3, restart_warmup_steps=1)
    cfg.train.update(steps=12, batch_size=4, micro_batch_size=4)
    return cfg


def test_trainer_merges_after_the_lr0_update_with_fresh_optimizer_state_after_the_warm_start():
    """A tiny ReLoRA (warm start 3, restarts every 3 of the 9 low-rank steps, dropout 0.1) through
    `trainer.Trainer`: W changes in the low-rank phase exactly after the official merge updates
    (7 and 10, tests/official/relora.py), each the update at lr 0; its state after such an update is
    the numpy merge of the state before (W + (alpha/r) B A, B = 0, a new A: the lr-0 update changed
    nothing) with the moments of A and B reset to 0 after it; after the warm start the optimizer
    state is entirely fresh (every leaf 0, as a new AdamW's), as the official `--warmed_up_model` run."""
    cfg = tiny_relora()
    _, events = official.run(num_training_steps=12, warm_start_steps=3, warm_start_lr=0.005, warm_start_warmup=1,
                             lr=0.01, warmup_steps=1, relora=3, restart_warmup_steps=1, min_lr_ratio=0.1)
    merges = [u for u, what in events if what == "merge"]
    assert merges == [7, 10] and [u for u, what in events if what == "optimizer reset"] == merges
    states = trainer_states(cfg)
    up = lambda s: states[s][0]["blocks"]["up"]
    assert [s for s in range(4, 13) if not np.array_equal(up(s - 1)["base"], up(s)["base"])] == merges
    for s in merges:
        assert optim.lr(cfg.optim, 12, s - 1) == 0
        before, after = states[s - 1][0]["blocks"], states[s][0]["blocks"]
        for name in common.PROJECTION_NAMES:
            b, a = before[name]["lora_b"], before[name]["lora_a"]
            assert np.abs(b).max() > 1e-4  # something to merge
            merged = before[name]["base"] + ALPHA / 8 * np.einsum("lor,lri->loi", b, a)
            np.testing.assert_allclose(after[name]["base"], merged, rtol=1e-6, atol=1e-7)
            assert not np.any(after[name]["lora_b"]) and not np.allclose(after[name]["lora_a"], a)
        for path, x in jax.tree_util.tree_leaves_with_path(states[s][1]):
            if getattr(path[-1], "key", None) in ("lora_a", "lora_b"):
                assert not np.any(x), path  # reset after the lr-0 update, not before it
    after_switch = jax.tree.leaves(states[3][1])
    assert len(after_switch) > 4 and all(not np.any(x) for x in after_switch)  # moments and step counts
    assert any(np.any(x) for x in jax.tree.leaves(states[2][1]))


def test_relora_a_init_zeros_trains_as_the_authors_wrapped_model():
    """`model.relora_a_init="zeros"` through `trainer.Trainer` (the tiny ReLoRA above) against the
    transcription of the authors' `ReLoRaLinear` as torchrun_main.py wraps the warmed-up model
    (tests/official/relora.py), every projection of every layer: after the warm start (step 3) A and
    B are the transcription's (both 0) and W is unchanged by the wrap; the transcription's gradients
    of A and B are then exactly 0, so neither moves (nor W) until the merge after update 7, which
    equals the transcription's `merge_and_reinit`: W unchanged, B = 0, a new Kaiming A (U(±1/√in),
    not 0); then B trains from update 8, A from 9 (after B's first step), and the merge after update
    10 is the transcription's merge of the state before (1e-6)."""
    torch = pytest.importorskip("torch")
    states = trainer_states(tiny_relora(relora_a_init="zeros"))
    blocks = lambda s: states[s][0]["blocks"]
    moved = lambda s, leaf: any(not np.array_equal(blocks(s - 1)[n][leaf], blocks(s)[n][leaf])
                                for n in common.PROJECTION_NAMES)
    assert [s for s in range(4, 13) if moved(s, "base")] == [10]  # the merge after 7 adds B A = 0
    assert [s for s in range(4, 13) if moved(s, "lora_b")] == [8, 9, 10, 11, 12]
    assert [s for s in range(4, 13) if moved(s, "lora_a")] == [7, 9, 10, 12]  # 8, 11: B was 0
    for name in common.PROJECTION_NAMES:
        for layer in range(2):
            p = lambda s, leaf: blocks(s)[name][leaf][layer]
            w = torch.tensor(p(3, "base"))
            wrapped = official.ReLoRaLinear(torch, w, 8, ALPHA)
            np.testing.assert_array_equal(p(3, "lora_a"), wrapped.lora_A.weight.detach().numpy())
            np.testing.assert_array_equal(p(3, "lora_b"), wrapped.lora_B.weight.detach().numpy())
            np.testing.assert_array_equal(p(3, "base"), wrapped.weight.numpy())
            wrapped.forward(torch.randn(5, w.shape[1])).square().sum().backward()
            assert not wrapped.lora_A.weight.grad.any() and not wrapped.lora_B.weight.grad.any()
            assert all(not np.any(p(s, "lora_a")) and not np.any(p(s, "lora_b")) for s in (4, 5, 6))
            wrapped.merge_and_reinit()
            np.testing.assert_array_equal(p(7, "base"), wrapped.weight.numpy())
            assert not np.any(p(7, "lora_b")) and 0 < np.abs(p(7, "lora_a")).max() <= 1 / math.sqrt(w.shape[1])
            with torch.no_grad():
                for leaf, x in ((wrapped.lora_A.weight, p(9, "lora_a")), (wrapped.lora_B.weight, p(9, "lora_b"))):
                    leaf.copy_(torch.tensor(x))
                wrapped.weight.copy_(torch.tensor(p(9, "base")))
            wrapped.merge_and_reinit()
            np.testing.assert_allclose(p(10, "base"), wrapped.weight.numpy(), rtol=1e-6, atol=1e-7)


def test_relora_a_init_is_checked():
    """model.relora_a_init: "kaiming" or "zeros"; "zeros" only for the lora kind under ReLoRA's jagged
    cosine (without merges A and B would stay 0)."""
    for fix, message in ((dict(relora_a_init="normal"), "model.relora_a_init must be 'kaiming' or 'zeros'"),
                         (dict(relora_a_init="zeros", projection="cola", lora_dropout=0.0),
                          "model.relora_a_init needs model.projection='lora', not 'cola'")):
        cfg = tiny_relora(**fix)
        with pytest.raises(config.ConfigError, match=message):
            config.validate(cfg)
    cfg = tiny_relora(relora_a_init="zeros")
    assert config.validate(cfg).relora_a_init == "zeros"
    cfg.optim.update(schedule="cosine", full_rank_steps=0)
    with pytest.raises(config.ConfigError, match="model.relora_a_init 'zeros' needs optim.schedule='jagged_cosine'"):
        config.validate(cfg)


def lora_state(seed=0):
    """(graphdef, params, opt_state) of a tiny LoRA model with random B and random Adam moments."""
    spec = small_spec(projection="lora")
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    for name in common.PROJECTION_NAMES:
        b = params["blocks"][name]["lora_b"]
        params["blocks"][name]["lora_b"] = jax.random.normal(next(keys), b.shape) * 0.05
    opt_state = optim.make(optim_section(restart_every=4, restart_warmup_steps=2), 100).init(params)
    random = lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return spec, graphdef, params, jax.tree.map(random, opt_state)


MERGE = jax.jit(lora.relora_merge, static_argnums=(0,))  # keep traced: one compilation for both tests


def keep_largest_by_hand(x, keep):
    x = np.asarray(x)
    out = np.zeros_like(x)
    for layer in range(x.shape[0]):
        if keep:
            threshold = np.quantile(np.abs(x[layer]), 1 - keep)  # linear interpolation, as torch.quantile
            out[layer] = np.where(np.abs(x[layer]) > threshold, x[layer], 0)
    return out


@pytest.mark.parametrize("keep", [0.0, 0.1])
def test_relora_merge_keeps_the_function_and_resets_exactly_the_factor_state(keep):
    spec, graphdef, params, opt_state = lora_state()
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, spec.vocab_size)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    before = forward(params)
    np_params, np_opt = jax.tree.map(np.asarray, (params, opt_state))
    new_params, new_opt = MERGE(ALPHA, keep, jnp.int32(4), params, opt_state, jax.random.key(7))
    np.testing.assert_allclose(forward(new_params), before, rtol=1e-5, atol=1e-5)
    for name in common.PROJECTION_NAMES:
        old, new = np_params["blocks"][name], new_params["blocks"][name]
        merged = old["base"] + ALPHA / 8 * np.einsum("lor,lri->loi", old["lora_b"], old["lora_a"])
        np.testing.assert_allclose(new["base"], merged, rtol=1e-6, atol=1e-6)
        assert np.abs(merged - old["base"]).max() > 1e-3  # the merge is not trivially zero
        assert not np.any(np.asarray(new["lora_b"]))
        a = np.asarray(new["lora_a"])
        assert np.abs(a).max() <= 1 / math.sqrt(a.shape[-1]) and not np.allclose(a, old["lora_a"])
    flat_old = jax.tree_util.tree_leaves_with_path(np_opt)
    flat_new = jax.tree_util.tree_leaves(new_opt)
    reset = 0
    for (path, old), new in zip(flat_old, flat_new, strict=True):
        name = getattr(path[-1], "key", None)
        if name in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(new, keep_largest_by_hand(old, keep))
            reset += 1
        else:
            np.testing.assert_array_equal(new, old)
    assert reset == 2 * 2 * len(common.PROJECTION_NAMES)  # mu and nu of A and B of every projection
    if keep:  # about keep of each tensor survives, the largest ones
        kept = np.mean(np.asarray(new_opt_leaf(new_opt, "q", "lora_a")) != 0)
        assert kept == pytest.approx(keep, abs=0.02)


def new_opt_leaf(opt_state, projection, leaf):
    """The first optimizer-state leaf at blocks/projection/leaf (Adam's mu)."""
    for path, x in jax.tree_util.tree_leaves_with_path(opt_state):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-3:] == ["blocks", projection, leaf]:
            return x
    raise KeyError(projection, leaf)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache: the three runs below compile the same functions."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def micro_relora(tmp_path_factory):
    cfg = config.preset("relora", "tiny")
    cfg.model.update(vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=2, rank=8,
                     dtype="float32")
    cfg.data.update(seq_len=32, tokenizer_vocab_size=512, tokenizer_sample_docs=20, val_docs=16)
    cfg.optim.update(lr=0.01, full_rank_lr=0.005, warmup_steps=1, full_rank_warmup_steps=0, full_rank_steps=3,
                     restart_every=3, restart_warmup_steps=1)
    cfg.train.update(steps=8, batch_size=8, micro_batch_size=8, log_every=1, eval_every=0, eval_batches=1,
                     baseline_batches=0, checkpoint_every=1, keep_checkpoints=8, sample_tokens=0)
    out = str(tmp_path_factory.mktemp("tok") / "micro")
    cfg.data.tokenizer = tokenizer.train_tokenizer(data.train_documents(cfg.data, 20), out, 512, "bpe", 20).path
    return cfg


def losses_and_lrs(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["step"] for r in records], [r["loss"] for r in records], [r["lr"] for r in records]


def test_relora_run_warm_starts_merges_and_resumes_with_identical_losses(compilation_cache, tmp_path_factory):
    """Steps 1-3 full-rank; after step 3 the switch to a fresh optimizer whose schedule warms up
    from 0 (step 4 at lr 0), a restart at its count 3 (step 7 at lr 0), the merge after step 7.
    Which parameters each step changed is read from the per-step checkpoints. Stopped after step 3
    and resumed, the losses (with LoRA dropout 0.1, the preset's) equal the uninterrupted run's."""
    cfg = micro_relora(tmp_path_factory)
    assert cfg.model.lora_dropout == 0.1
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, lrs = losses_and_lrs(full)
    assert steps == list(range(1, 9)) and [s for s, lr in zip(steps, lrs) if lr == 0] == [4, 7]
    up = [jax.tree.map(np.asarray, checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]) for s in steps]
    changed = {s: {k for k in up[s - 1] if not np.array_equal(up[s - 2][k], up[s - 1][k])} for s in steps[1:]}
    # A gets no gradient while B = 0 (steps 5, 8); no weight decay in the preset
    assert changed == {2: {"base"}, 3: {"base"}, 4: set(), 5: {"lora_b"}, 6: {"lora_a", "lora_b"},
                       7: {"base", "lora_a", "lora_b"}, 8: {"lora_b"}}
    assert [s for s in steps if np.any(up[s - 1]["lora_b"])] == [5, 6, 8]  # B = 0 until trained, 0 after a merge
    assert loop.run(cfg, parts, stop_after=3) is None
    loop.run(cfg, parts)
    assert losses_and_lrs(parts)[0] == steps
    np.testing.assert_allclose(losses_and_lrs(parts)[1], losses, rtol=1e-6)


def test_lora_parameter_and_optimizer_state_counts_by_hand():
    cfg = config.preset("relora", "60m")
    spec = config.validate(cfg)
    d, f, v, n_layers, r = 512, 1376, 32000, 8, 128
    shapes = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    full, low = sum(i * o for i, o in shapes), sum(r * (i + o) for i, o in shapes)
    other = 2 * v * d + 2 * n_layers * d + d  # embed, lm_head, two norms per block, final norm
    counts = model.count_params(spec)
    assert counts["total"] == other + n_layers * (full + low)
    assert counts["trainable"] == other + n_layers * low  # W frozen
    assert counts["trainable_full_rank"] == other + n_layers * full  # A, B frozen in the warm start
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(spec)))
    # optax's Adam (LoRA asks for no per-vector step counts, `vector_steps`): mu and nu, one step count;
    # and the lr schedule's count.
    for full_rank, trained in ((False, counts["trainable"]), (True, counts["trainable_full_rank"])):
        state = jax.eval_shape(optim.make(cfg.optim, cfg.train.steps, full_rank, cfg.model.projection).init, params)
        assert sum(x.size for x in jax.tree.leaves(state)) == 2 * trained + 1 + 1
