"""LoRA (`model.projection="lora"`, colax.projections.lora.LoRA) against its authors' `loralib==0.1.2`
(microsoft/LoRA, `loralib.Linear`), from the `parity` extra."""

import numpy as np
from conftest import authors_package, small_spec
from flax import nnx

from colax.projections import lora


def test_forward_and_init_equal_loralib_linear():
    """The same W, A, B (B nonzero) give loralib.Linear's output, x Wᵀ + (α / r) x Aᵀ Bᵀ
    (layers.py:143-148, no dropout), to 1e-5 relative in fp32; the fresh factors are drawn alike:
    A Kaiming-uniform with a = √5 (layers.py:123, U(±1/√in)), std within 3 % of loralib's draw,
    B = 0 (layers.py:124)."""
    torch, loralib = authors_package("torch"), authors_package("loralib")
    d_in, d_out, r = 256, 96, 64
    spec = small_spec(projection="lora")
    ours = lora.LoRA(d_in, d_out, r, spec, rngs=nnx.Rngs(0))
    theirs = loralib.Linear(d_in, d_out, r=r, lora_alpha=spec.lora_alpha, bias=False)
    a_std = [float(np.std(np.asarray(ours.lora_a[...]))), float(theirs.lora_A.detach().std())]
    assert abs(a_std[0] / a_std[1] - 1) < 0.03 and np.abs(np.asarray(ours.lora_a[...])).max() <= d_in ** -0.5
    assert not np.any(np.asarray(ours.lora_b[...])) and not theirs.lora_B.detach().any()
    assert ours.scale == theirs.scaling

    rng = np.random.default_rng(0)
    b = rng.standard_normal((d_out, r)).astype(np.float32) * 0.1
    ours.lora_b[...] = b
    with torch.no_grad():
        for name, x in (("weight", ours.base[...]), ("lora_A", ours.lora_a[...]), ("lora_B", b)):
            getattr(theirs, name).copy_(torch.from_numpy(np.array(x, np.float32)))
    x = rng.standard_normal((3, 5, d_in)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    got = np.asarray(ours(x))
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"lora forward vs loralib: rel {err:.1e}, A std {a_std[0]:.4f} vs {a_std[1]:.4f}")
    assert err <= 1e-5
