"""SLTrain 60M (Han et al., 2024): sparse plus low-rank projections on the paper's 60M LLaMA
(CoLA's size, rank and schedule; alpha, lr 0.003 and no weight decay from SLTrain; docs/methods.md)."""

from colax import config


def get_config():
    return config.preset("sltrain", "60m")
