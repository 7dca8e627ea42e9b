"""CR-Net (Kong et al., ICLR 2026, arXiv 2509.18993) at the paper's 130M LLaMA size:
rank 235 (colax.projections.crnet.RANK: the integer rank whose count, 93.97M, is closest to CoLA's 94.00M at this size).

Recipe source: none available (KongBoao/CR-Net could not be read here): CoLA's, from
alvin-zyl/CoLA@91ff0d1 scripts/cola_scripts/cola130m.sh (lr, warmup, steps, weight decay 0.01, clip 0.5),
so that CR-Net and CoLA train on the same schedule; docs/methods.md#cr-net.
"""

from colax import config


def get_config():
    return config.preset("crnet", "130m")
