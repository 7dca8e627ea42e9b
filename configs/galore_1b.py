"""GaLore on the paper's 1b full-rank LLaMA: the reference recipe (see colax.config.LOW_RANK_OPTIM)."""

from colax import config


def get_config():
    return config.preset("galore", "1b")
