"""60M ReLoRA (LoRA with a full-rank warm start, merges every K steps, jagged cosine);
model size and recipe: colax.config.preset."""

from colax import config


def get_config():
    return config.preset("relora", "60m")
