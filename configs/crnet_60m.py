"""CR-Net (Kong et al., ICLR 2026) at the paper's 60M LLaMA size, with CoLA's rank and recipe (docs/methods.md)."""

from colax import config


def get_config():
    return config.preset("crnet", "60m")
