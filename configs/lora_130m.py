"""130M LoRA (frozen full weight + trained rank-r factors, no merges);
model size and recipe: colax.config.preset."""

from colax import config


def get_config():
    return config.preset("lora", "130m")
