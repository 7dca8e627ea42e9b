"""The paper's 350M CoLA (low-rank activation) LLaMA: model size and training recipe (colax.config.SIZES).

Recipe source: alvin-zyl/CoLA@91ff0d1 scripts/cola_scripts/cola350m.sh and cola_configs/cola_350m.json
(lr, weight decay 0.01, clip 0.5, 512 sequences of 256 tokens, steps, warmup, cosine to 0.1 lr, rank,
only_lr_act). One difference: the script's --dtype bfloat16 casts the weights to bf16; colax computes
in bf16 and keeps fp32 weights (--config.model.param_dtype=bfloat16 is the script's pure-bf16 mode).
"""

from colax import config


def get_config():
    return config.preset("cola", "350m")
