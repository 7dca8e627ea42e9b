"""The paper's 130M CoLA (low-rank activation) LLaMA: model size and training recipe (see colax.config.SIZES)."""

from colax import config


def get_config():
    return config.preset("cola", "130m")
