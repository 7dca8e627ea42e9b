"""LoRA / ReLoRA: the layer, the merge-and-reinit hook, the jagged cosine, and the hook through the loop.

References are written here in numpy from the papers' formulas (Lialin et al., ICLR 2024).
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

from colax import checkpoint, config, data, loop, model, optim, schedules, tokenizer
from colax.projections import common, lora
from conftest import small_spec

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


def optim_section(**kw):
    o = optim.defaults()
    o.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="jagged_cosine", **kw)
    return o


def cosine_by_hand(t, total=100, warmup=10, lo=0.1):
    if t < warmup:
        return t / warmup
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("warm_start,every,restarts", [(20, 30, (20, 50, 80)), (0, 30, (30, 60, 90)),
                                                        (20, 0, (20,))])
def test_jagged_cosine_drops_to_zero_and_rewarms_onto_the_cosine(warm_start, every, restarts):
    o = optim_section(full_rank_steps=warm_start, restart_every=every, restart_warmup_steps=5)
    lr = optim.schedule(o, 100)
    for t in range(100):
        last = max([r for r in restarts if r <= t], default=None)
        if last is not None and t - last < 5:  # 0 at the restart, then linear onto cosine(last + 5)
            want = (t - last) / 5 * cosine_by_hand(last + 5)
        else:
            want = cosine_by_hand(t)
        assert float(lr(t)) == pytest.approx(want, abs=1e-6), t
    assert [s for s in range(1, 100) if schedules.is_restart(o, s)] == list(restarts)
    assert float(lr(restarts[0])) == 0 and float(lr(restarts[0] + 2)) == pytest.approx(
        0.4 * cosine_by_hand(restarts[0] + 5))  # two values by hand as well
    o.schedule = "cosine"
    assert not any(schedules.is_restart(o, s) for s in range(100))


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
    cfg.optim.update(lr=0.01, warmup_steps=0, full_rank_steps=3, restart_every=3, restart_warmup_steps=1)
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
    """Steps 1-3 full-rank; after step 3 the switch and a restart (merge), another restart after
    step 6; the lr is 0 right after each (steps 4, 7). Which parameters each step changed is read
    from the per-step checkpoints. Stopped after step 3 and resumed, the losses equal the
    uninterrupted run's."""
    cfg = micro_relora(tmp_path_factory)
    full, parts = str(tmp_path_factory.mktemp("full")), str(tmp_path_factory.mktemp("parts"))
    loop.run(cfg, full)
    steps, losses, lrs = losses_and_lrs(full)
    assert steps == list(range(1, 9)) and [s for s, lr in zip(steps, lrs) if lr == 0] == [4, 7]
    up = [jax.tree.map(np.asarray, checkpoint.load_params(cfg, full, s)[1]["blocks"]["up"]) for s in steps]
    changed = {s: {k for k in up[s - 1] if not np.array_equal(up[s - 2][k], up[s - 1][k])} for s in steps[1:]}
    assert changed == {2: {"base"}, 3: {"base", "lora_a"}, 4: set(), 5: {"lora_a", "lora_b"},
                       6: {"base", "lora_a", "lora_b"}, 7: set(), 8: {"lora_a", "lora_b"}}
    assert [s for s in steps if np.any(up[s - 1]["lora_b"])] == [5, 8]  # B = 0 until trained, 0 after a merge
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
    # Adam's step counts and holds (colax.row_adam): one each per trained leaf outside the projections
    # (embed, lm_head, two block norms, final norm), per vector of A and B (`vector_steps`), per W;
    # and the lr schedule's count.
    steps = {False: 2 * (5 + 7 * 2 * n_layers * r), True: 2 * (5 + 7)}
    for full_rank, trained in ((False, counts["trainable"]), (True, counts["trainable_full_rank"])):
        state = jax.eval_shape(optim.make(cfg.optim, cfg.train.steps, full_rank).init, params)
        assert sum(x.size for x in jax.tree.leaves(state)) == 2 * trained + steps[full_rank] + 1  # mu, nu; counts
