"""The paper's 7B CoLA (low-rank activation) LLaMA: model size and training recipe (see colax.config.SIZES)."""

from colax import config


def get_config():
    return config.preset("cola", "7b")
