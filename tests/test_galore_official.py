"""GaLore and Fira (optim.name = galore | fira) against their authors' optimizers.

References: `galore-torch==1.0` (galore_torch.adamw.AdamW, jiaweizzhao/GaLore) and `fira==1.0.2`
(fira.FiraAdamW, xichen-fy/Fira), from the `parity` extra, with the parameter groups their
training scripts build. Both get the same gradients (transposed to torch's [out, in]) and the
same lr at every step; colax's whole optimizer (`optim.make`: the projected weights and the
Adam of the rest) is compared with theirs over steps that include projector refreshes, on
square and non-square weights in both orientations.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import authors_package

from colax import galore, optim

L, D, F, V, RANK = 2, 16, 24, 32, 4
# colax [in, out] layouts: q square, up wider than tall, down taller than wide; embed and the norm
# are not projected (the reference's regular group).
SHAPES = {"embed": (V, D), "blocks/q/w": (L, D, D), "blocks/up/w": (L, D, F), "blocks/down/w": (L, F, D),
          "blocks/attn_norm/weight": (L, D)}
# Gradient sizes per step: ~1e-3 as in LLM training (where eps matters), growing (Fira's limiter
# acts) and shrinking.
GRAD_SCALES = (1e-3, 3e-3, 5e-4, 4e-3, 1e-3, 2e-3)
GAP = 2  # refreshes at steps 0, 2, 4


def rel(a, b):
    """||a - b|| / ||b||, fp64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def leaves(tree):
    """{"blocks/q/w": array, ...} of a colax params-shaped tree."""
    return {"/".join(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def torch_model(torch, params):
    """A torch module holding `params` in torch's layout, named as the reference LLaMA's modules
    (`layers.i.self_attn.q_proj`, `layers.i.mlp.up_proj`, ...), and {colax leaf: [(torch tensor, layer
    or None)]}: a [L, in, out] colax leaf is L Linear weights [out, in]."""
    nn = torch.nn
    names = {"q": ("self_attn", "q_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}
    model, pairs = nn.Module(), {}
    model.embed_tokens = nn.Embedding(V, D)
    model.layers = nn.ModuleList()
    for i in range(L):
        layer = nn.Module()
        for key, (block, proj) in names.items():
            if not hasattr(layer, block):
                setattr(layer, block, nn.Module())
            linear = nn.Linear(*SHAPES[f"blocks/{key}/w"][1:], bias=False)
            setattr(getattr(layer, block), proj, linear)
            pairs.setdefault(f"blocks/{key}/w", []).append((linear.weight, i))
        layer.input_layernorm = nn.Parameter(torch.ones(D))
        pairs.setdefault("blocks/attn_norm/weight", []).append((layer.input_layernorm, i))
        model.layers.append(layer)
    pairs["embed"] = [(model.embed_tokens.weight, None)]
    model.to(torch.float32 if next(iter(params.values())).dtype == np.float32 else torch.bfloat16)
    with torch.no_grad():
        for key, targets in pairs.items():
            for tensor, i in targets:
                tensor.copy_(to_torch(torch, params[key], i))
    return model, pairs


def to_torch(torch, x, layer):
    """colax array (or layer `layer` of a stack) in torch's layout: matrices transposed, same dtype."""
    dtype = torch.float32 if x.dtype == np.float32 else torch.bfloat16
    x = np.asarray(x if layer is None else x[layer], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.T if x.ndim == 2 and layer is not None else x)).to(dtype)


def from_torch(pairs, key):
    """A colax-layout fp32 copy of the torch tensors standing for leaf `key`."""
    parts = [t.detach().float().numpy().copy() for t, _ in pairs[key]]
    if pairs[key][0][1] is None:
        return parts[0]
    return np.stack([p.T if p.ndim == 2 else p for p in parts])


def official_optimizer(name, model, o):
    """The authors' optimizer with their scripts' parameter groups.

    GaLore: jiaweizzhao/GaLore@2cc66f8:torchrun_main.py:263-283 (Linear weights of modules named
    "attn" or "mlp" in a group with rank, update_proj_gap, scale, proj_type) and :296 (GaLoreAdamW
    with lr and weight_decay); Fira: its package's `divide_params` (xichen-fy/Fira@5c28b13:README.md
    "Example", the same groups as pre_training_c4/torchrun_main.py:266-283) and :297.
    """
    torch = authors_package("torch")
    if name == "fira":
        fira = authors_package("fira")
        groups = fira.divide_params(model, target_modules_list=["attn", "mlp"], rank=o.rank,
                                    update_proj_gap=o.update_proj_gap, alpha=o.scale, proj_type="std")
        return fira.FiraAdamW(groups, lr=o.lr, weight_decay=o.weight_decay, no_deprecation_warning=True)
    adamw = authors_package("galore_torch.adamw")
    projected = [m.weight for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and any(k in n for k in ["attn", "mlp"])]
    regular = [p for p in model.parameters() if all(p is not q for q in projected)]
    groups = [{"params": regular}, {"params": projected, "rank": o.rank, "update_proj_gap": o.update_proj_gap,
                                    "scale": o.scale, "proj_type": "std"}]
    return adamw.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, no_deprecation_warning=True)


def galore_state(opt_state):
    """The ScaleByGaloreState inside `optim.make`'s state."""
    is_state = lambda x: isinstance(x, galore.ScaleByGaloreState)
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x))


def nest(flat):
    """{"blocks/q/w": x, ...} -> the nested params dict."""
    tree = {}
    for key, x in flat.items():
        *parents, last = key.split("/")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = x
    return tree


def at(tree, key):
    """The array of GaLore-state tree `tree` at leaf `key` ("blocks/q/w"), under its layout key, fp32."""
    for k in key.split("/"):
        tree = tree[k]
    (x,) = tree.values()
    return np.asarray(x, np.float32)


PROJECTED = ("blocks/q/w", "blocks/up/w", "blocks/down/w")


def signs_from(targets, original):
    """The reference projector's `get_orthogonal_matrix`, its singular vectors' signs set to colax's:
    `targets` maps id(gradient tensor) to colax's projector in torch's layout. SVD signs are
    arbitrary (LAPACK's for the layout it is given: colax's and torch's differ, and the moments carry
    over a refresh, so a flip changes the next steps); the subspace and everything else stay theirs."""
    torch = authors_package("torch")

    def get_orthogonal_matrix(self, weights, rank, type):
        b = original(self, weights, rank, type)
        target = torch.from_numpy(targets[id(weights)]).to(b.dtype)
        if target.shape != b.shape:  # colax projects the other side: `compare` says so
            return b
        vectors = 1 if type == "right" else 0  # rows of a right projector [r, in], columns of a left one
        return b * torch.sign((b.float() * target.float()).sum(vectors, keepdim=True)).to(b.dtype)

    return get_orthogonal_matrix


def run_both(name, dtype, weight_decay=0.0, lr=0.01):
    """Steps colax's and the authors' optimizer on the same gradients, fp32 or bf16 parameters and
    state (dtype). Yields, before the first step (t = -1) and after each: (t, colax params, official
    params (both fp32 numpy, colax layout), colax's ScaleByGaloreState or None, official optimizer,
    {colax leaf: [(torch tensor, layer)]})."""
    torch = authors_package("torch")
    rng = np.random.default_rng(0)
    # Without weight decay the steps do not depend on the parameters: they start at 0, so that bf16
    # rounds the parameters relative to the steps taken.
    params = {k: (rng.standard_normal(s) * (1.0 if weight_decay else 0.0)).astype(dtype) for k, s in SHAPES.items()}
    o = optim.defaults()
    o.update(name=name, rank=RANK, update_proj_gap=GAP, scale=0.25, lr=lr, eps=1e-6, warmup_steps=0,  # their eps
             weight_decay=weight_decay, grad_clip=0.0)
    tx, schedule = optim.make(o, len(GRAD_SCALES)), optim.schedule(o, len(GRAD_SCALES))
    p = nest(params)
    st, update = tx.init(p), jax.jit(tx.update)
    model, pairs = torch_model(torch, params)
    opt = official_optimizer(name, model, o)
    as_fp32 = lambda flat: {k: np.asarray(v, np.float32) for k, v in flat.items()}
    projector_class = (authors_package("fira.gradient_projection").GradientProjector if name == "fira" else
                       authors_package("galore_torch.galore_projector").GaLoreProjector)
    targets = {}
    yield -1, as_fp32(params), {k: from_torch(pairs, k) for k in pairs}, None, opt, pairs
    with mock.patch.object(projector_class, "get_orthogonal_matrix",
                           signs_from(targets, projector_class.get_orthogonal_matrix)):
        for t, g_scale in enumerate(GRAD_SCALES):
            grads = {k: (rng.standard_normal(s) * g_scale).astype(dtype) for k, s in SHAPES.items()}
            updates, st = update(nest(grads), st, p)
            p = optax.apply_updates(p, updates)
            for key, torch_params in pairs.items():
                for tensor, i in torch_params:
                    tensor.grad = to_torch(torch, grads[key], i)
                    if key in PROJECTED:
                        targets[id(tensor.grad)] = np.ascontiguousarray(at(galore_state(st).projector, key)[i].T)
            for group in opt.param_groups:  # the reference's LambdaLR sets each step's lr
                group["lr"] = float(schedule(t))
            opt.step()
            yield t, as_fp32(leaves(p)), {k: from_torch(pairs, k) for k in pairs}, galore_state(st), opt, pairs


def compare(name, dtype, **kw):
    """Runs `run_both`; returns the largest relative errors (colax against official) of a parameter's
    change in one step and since the start, the largest difference of the projectors (colax's P
    against the official's transposed) and of Fira's stored residual norms (relative), and how many
    times Fira's limiter capped a growth in colax's state. Signs of the official singular vectors
    are set to colax's (`signs_from`)."""
    errors = dict(step=0.0, total=0.0, projector=0.0, norm=0.0)
    capped, start, before, norms = 0, None, None, {}
    for t, ours, theirs, st, opt, pairs in run_both(name, dtype, **kw):
        if before is not None:
            errors["step"] = max(errors["step"], *(rel(ours[k] - before[0][k], theirs[k] - before[1][k]) for k in ours))
            errors["total"] = max(errors["total"], *(rel(ours[k] - start[k], theirs[k] - start[k]) for k in ours))
        start, before = start or theirs, (ours, theirs)
        for key in PROJECTED if st is not None else ():
            for tensor, i in pairs[key]:
                state = opt.state[tensor]
                ours_p, official = at(st.projector, key)[i], state["projector"].ortho_matrix.float().numpy().T
                assert ours_p.shape == official.shape, f"{key}: colax's projector {ours_p.shape}, the official's " \
                    f"transposed {official.shape}: the other side is projected"
                errors["projector"] = max(errors["projector"], float(np.abs(ours_p - official).max()))
                if name == "fira":
                    norm = float(at(st.norm, key)[i])
                    errors["norm"] = max(errors["norm"], rel(norm, float(state["scaling_grad"])))
                    capped += (key, i) in norms and abs(norm / norms[key, i] - galore.GAMMA) < 1e-5
                    norms[key, i] = norm
    print(f"{name} {np.dtype(dtype).name} {kw}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + f", limiter capped {capped}x")
    return errors, capped


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_steps_equal_the_authors_optimizer_fp32(name):
    """fp32, wd 0 (the recipes'): every parameter's change in every step and since the start equals
    the official one to 1e-4 relative (measured <= 3e-5), through refreshes at steps 0, 2, 4; the
    projectors equal theirs to 1e-4 (2e-5); Fira's stored residual norms to 1e-5 (5e-6), and its
    limiter capped a growth."""
    errors, capped = compare(name, np.float32)
    assert errors["step"] <= 1e-4 and errors["total"] <= 1e-4 and errors["projector"] <= 1e-4
    assert name == "galore" or (errors["norm"] <= 1e-5 and capped > 0)


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_weight_decay_is_the_authors_after_the_step(name):
    """Decoupled weight decay as the reference's, of the already stepped p: p <- (p - lr c_t d)(1 - lr
    wd) (galore_torch/adamw.py:129-140, fira/fira_adamw.py:153-164), on every parameter, wd 1 at lr
    0.01 (the decay the larger part of the step, which keeps fp32's rounding of p ~ 1 small beside
    it): every step and the change since the start equal theirs to 1e-4 relative (measured 3.2e-5,
    6.8e-6). Decaying the p before the step (optax.adamw's order) is off by lr · wd · lr c_t d:
    7.1e-3 here (wd 0.1: 1.0e-3, under fp32's 2.5e-4 rounding of the late, small steps)."""
    errors, _ = compare(name, np.float32, weight_decay=1.0, lr=0.01)
    assert errors["step"] <= 1e-4 and errors["total"] <= 1e-4


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_parameters_equal_the_authors_optimizer_bf16_state(name):
    """bf16 parameters, gradients and optimizer state (colax's param_dtype="bfloat16", the
    reference's `--dtype bfloat16`): both round every operation to bf16 (2^-8 relative), in a
    different order. The parameters' change since the start equals the official one to 2e-2
    relative (measured 8e-3), the projectors to 1e-2 (1e-3), Fira's norms (theirs stored in bf16,
    colax's fp32) to 3e-2 (1.1e-2). Single steps late in the schedule are a few bf16 ulps of the
    parameters, so they are not compared one by one."""
    errors, _ = compare(name, jnp.bfloat16)
    assert errors["total"] <= 2e-2 and errors["projector"] <= 1e-2 and errors["norm"] <= 3e-2
