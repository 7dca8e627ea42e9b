"""What the projection kinds share: the seven projections of a block, their shapes, init helpers
and the LoRA-style scale `lora_alpha` (a model-section key of several kinds).

Imports nothing of colax.projections (every kind module imports this one).
"""

from flax import nnx

# The seven projections of a decoder block, in the order the paper lists them.
PROJECTION_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def projection_shapes(d, f):
    """{name: (in, out)} of the seven projections for hidden size d and intermediate size f."""
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def normal(std):
    """The N(0, std) initializer."""
    return nnx.initializers.normal(stddev=std)


# The model-section key of the kinds whose low-rank term is scaled by alpha / rank.
ALPHA_CONFIG = dict(
    lora_alpha=32.0,  # LoRA's alpha: the low-rank term is scaled by lora_alpha / rank
)


def check_alpha(m, require):
    """ConfigError (through `require`) unless model.lora_alpha > 0."""
    require(m.lora_alpha > 0, "lora_alpha", "must be > 0", m.lora_alpha)
