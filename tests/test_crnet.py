"""CR-Net (Kong et al., ICLR 2026): parameter counts, the forward against a per-layer loop, the
residual inversion, and the `crnet` remat policy's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from colax import config, model, plan, remat
from colax.errors import ConfigError
from colax.projections import crnet
from conftest import small_spec
from test_model import ref_forward


def crnet_params(spec, seed=0):
    """(graphdef, params) of a CR-Net model whose betas are spread over [-1.5, 1.5] (init is 1),
    so that a wrong scale or sign shows."""
    graphdef, state = nnx.split(model.Transformer(spec, rngs=nnx.Rngs(seed)))
    params = nnx.to_pure_dict(state)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 7))
    for name, proj in params["blocks"].items():
        if "beta" in proj:
            proj["beta"] = jax.random.uniform(next(keys), proj["beta"].shape, minval=-1.5, maxval=1.5)
    return graphdef, params


def by_hand(d, f, v, layers, r):
    """CR-Net parameters: embeddings and lm_head, 2 norms per block and the final one, block 1's
    full-rank projections, and per later block A, B and beta of each of the 7 projections."""
    shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    first = sum(i * o for i, o in shapes)
    later = sum(r * (i + o) + 1 for i, o in shapes)
    return 2 * v * d + d + 2 * d * layers + first + (layers - 1) * later


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b"])
def test_parameter_counts_of_the_presets(size):
    spec = config.validate(config.preset("crnet", size))
    d, f, _, layers, r, *_ = config.SIZES[size]
    r = crnet.RANK.get(size, r)
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.rank["q"]) == (d, f, layers, r)
    counts = model.count_params(spec)
    assert counts["total"] == by_hand(d, f, 32000, layers, r)
    assert counts["embeddings"] == 2 * 32000 * d
    assert counts["lowrank"] == (layers - 1) * sum(r * (i + o) + 1 for i, o in [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)])


@pytest.mark.parametrize("size", ["60m", "130m", "350m"])
def test_ranks_align_the_count_with_colas(size):
    """Parameter-aligned with CoLA (as the paper states its comparisons): at each size without a
    CR-Net count from the paper, the rank is the integer whose total is closest to CoLA's total at
    that size (rank +- 1 are farther), within 0.05 % (60M 100: 42.77M vs 42.77M; 130M 235: 93.97M vs
    94.00M; 350M 239: 185.22M vs 185.22M)."""
    cola = model.count_params(config.validate(config.preset("cola", size)))["total"]
    d, f, _, layers, *_ = config.SIZES[size]
    r = config.preset("crnet", size).model.rank
    off = lambda rank: abs(by_hand(d, f, 32000, layers, rank) - cola)
    assert off(r) < min(off(r - 1), off(r + 1)) and off(r) <= 5e-4 * cola


def test_1b_count_is_the_papers():
    """583M: CR-Net 1B in the paper's main table (arXiv 2509.18993; quoted, with full-rank 1339M and
    CoLA 609M, by the papernotes.org summary of the paper), to 0.5 %; the same table's full-rank and
    CoLA counts come out of colax's llama_1b and cola_1b to 0.1 %."""
    count = lambda kind: model.count_params(config.validate(config.preset(kind, "1b")))["total"]
    assert count("crnet") == pytest.approx(583e6, rel=0.005)
    assert count("llama") == pytest.approx(1339e6, rel=1e-3) and count("cola") == pytest.approx(609e6, rel=1e-3)


def test_scale_is_signed_and_never_zero():
    """s(beta) = sign(beta) (|beta| + 1e-6) (the paper's Eq., eps 1e-6) with sign(0) = +1: at beta = 0
    a block's output is 1e-6 x the previous one plus x A B and inverts exactly (with s = beta it
    would be 0 and the inversion 0 / 0)."""
    np.testing.assert_allclose(crnet.signed_scale(jnp.array([0.0, 0.5, -0.5, -2.0])),
                               [1e-6, 0.500001, -0.500001, -2.000001], rtol=1e-7)
    cfg = small_spec(projection="crnet")
    proj = crnet.CRNet(16, 24, 4, cfg, rngs=nnx.Rngs(0))
    proj.beta[...] = jnp.zeros(())
    proj.B[...] = jnp.zeros_like(proj.B[...])  # y = s(0) prev exactly: the check below is on s alone
    prev = jax.random.normal(jax.random.key(1), (2, 5, 24))
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    y = proj(x, prev)
    np.testing.assert_allclose(y, 1e-6 * prev, rtol=1e-6)
    np.testing.assert_allclose(proj.invert(y, proj.bottleneck(x)), prev, rtol=1e-5)


def test_a_fresh_block_adds_the_previous_output_at_scale_one():
    """As documented (beta starts at 1, s(1) = 1 + 1e-6): a freshly built CR-Net projection, and every
    beta of a fresh model, computes prev + (x A) B, against numpy in float64 (rtol 1e-5, atol 1e-5). With beta
    initialised to 0 it would compute 1e-6 prev + (x A) B (every other test overwrites beta)."""
    proj = crnet.CRNet(16, 24, 4, small_spec(projection="crnet"), rngs=nnx.Rngs(0))
    prev = jax.random.normal(jax.random.key(1), (2, 5, 24))
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    a, b = (np.asarray(p[...], np.float64) for p in (proj.A, proj.B))
    want = np.asarray(prev, np.float64) + np.asarray(x, np.float64) @ a @ b
    np.testing.assert_allclose(np.asarray(proj(x, prev), np.float64), want, rtol=1e-5, atol=1e-5)  # float32 dots
    params = nnx.to_pure_dict(nnx.state(model.Transformer(small_spec(projection="crnet", num_layers=3),
                                                          rngs=nnx.Rngs(0))))
    betas = [np.asarray(p["beta"]) for p in params["blocks"].values() if "beta" in p]
    assert len(betas) == 7 and all(np.array_equal(beta, np.ones(2)) for beta in betas)


def test_block_one_is_full_rank_and_later_blocks_have_no_full_rank_weight():
    params = nnx.to_pure_dict(nnx.state(model.abstract_model(small_spec(projection="crnet", num_layers=3))))
    assert set(params["first_block"]["q"]) == {"w"} and params["first_block"]["q"]["w"].shape == (32, 32)
    assert set(params["blocks"]["q"]) == {"A", "B", "beta"}
    assert params["blocks"]["up"]["A"].shape == (2, 32, 8) and params["blocks"]["up"]["beta"].shape == (2,)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_matches_a_per_layer_loop(scan_layers):
    spec = small_spec(projection="crnet", num_layers=3, scan_layers=scan_layers)
    graphdef, params = crnet_params(spec)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, spec.vocab_size)
    got = nnx.merge(graphdef, params)(tokens)
    want = ref_forward(params, np.asarray(tokens), spec)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_inverting_the_residual_reproduces_every_earlier_output():
    # From the last block's outputs alone, Y_{l-1} = (Y_l - X_l A_l B_l) / s(beta_l) walks back to
    # block 1: each recovered Y_l equals the forward's (float32, 4 inversions in a row).
    spec = small_spec(projection="crnet", num_layers=5)
    net = nnx.merge(*crnet_params(spec))
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, spec.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    x, carry = net.first_block(net.embed[...][tokens], positions, None)
    graphdef, stacked = nnx.split(net.blocks)
    blocks = [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked)) for i in range(spec.num_layers - 1)]
    ys, xas = [carry], []
    for block in blocks:  # the forward, block by block, keeping each block's x A
        (x, carry), out = nnx.capture(block, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            x, positions, None, carry)
        ys.append(carry)
        xas.append({name: v["bottleneck"][0] for name, v in nnx.to_pure_dict(out).items() if "bottleneck" in v})
    _, acts = net(tokens, capture=True)  # the same outputs as the model's own (scanned) forward,
    for name, y in ys[-1].items():       # up to float32 reassociation (|y| up to ~5 here)
        np.testing.assert_allclose(y, acts[name]["y"][-1], rtol=1e-5, atol=1e-5)
    outputs = ys[-1]
    for i in reversed(range(spec.num_layers - 1)):
        outputs = blocks[i].invert(outputs, xas[i])
        for name, y in outputs.items():
            np.testing.assert_allclose(y, ys[i][name], rtol=1e-4, atol=2e-5, err_msg=f"{name}, layer {i + 1}")


def loss_and_grads(graphdef, params, tokens):
    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


def test_crnet_remat_gradients_equal_no_remat_gradients(monkeypatch):
    # Full outputs kept every 2nd block here (EVERY=2, 4 layers: segments of block 2 and blocks
    # 3-4), so the backward both starts segments from kept outputs and inverts inside them.
    monkeypatch.setattr(remat, "EVERY", 2)
    assert remat.segment_ends(4) == [1, 3]
    tokens = jax.random.randint(jax.random.key(5), (2, 13), 0, 64)
    results = {}
    for policy in ("none", "crnet"):
        spec = small_spec(projection="crnet", num_layers=4, remat=policy)
        results[policy] = loss_and_grads(*crnet_params(spec), tokens)
    (loss, grads), (want_loss, want_grads) = results["crnet"], results["none"]
    assert loss == pytest.approx(float(want_loss), rel=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
        np.testing.assert_allclose(g, want, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_segments_keep_full_outputs_every_8th_block_and_the_last():
    assert remat.segment_ends(24) == [7, 15, 23]  # blocks 2..24 stacked: kept after blocks 8, 16, 24
    assert remat.segment_ends(8) == [7] and remat.segment_ends(9) == [7, 8]


def test_crnet_policy_keeps_block_input_and_bottlenecks_per_block():
    cfg = config.preset("crnet", "60m")
    spec = config.validate(cfg).replace(remat="crnet")
    saved = plan.saved_per_block(spec, 2, 16)
    assert plan.per_token(spec, saved, 2, 16) == (512 + 7 * crnet.RANK["60m"] + (5 * 512 + 2 * 1376) / 8, "d+7r+(5d+2f)/8")


@pytest.mark.parametrize("overrides,field", [
    (dict(projection="crnet", only_lr_act=True), "only_lr_act"),
    (dict(projection="crnet", num_layers=1), "num_layers"),
    (dict(projection="cola", remat="crnet"), "remat"),
])
def test_bad_crnet_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^model\.{field} "):
        small_spec(**overrides)
