"""1b SwitchLoRA (frozen W + LoRA whose vectors are switched for candidates on a schedule);
model size and recipe: colax.config.preset."""

from colax import config


def get_config():
    return config.preset("switchlora", "1b")
