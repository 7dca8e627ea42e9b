"""The paper's 7B full-rank LLaMA baseline: model size and training recipe (see colax.config.SIZES)."""

from colax import config


def get_config():
    return config.preset("llama", "7b")
