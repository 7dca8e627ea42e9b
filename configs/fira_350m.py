"""Fira on the paper's 350m full-rank LLaMA: the authors' recipe (colax.config.LOW_RANK_OPTIM).

Recipe source: xichen-fy/Fira@5c28b13 pre_training_c4/scripts/llama_350m.sh (lr 0.01, alpha 0.25,
rank 256, T 200, weight decay 0, no clipping, 512 sequences of 256 tokens, 60k steps, 6k warmup,
cosine to 0.1 lr). One difference: the script's --dtype bfloat16 casts the weights to bf16; colax computes
in bf16 and keeps fp32 weights (--config.model.param_dtype=bfloat16 is the script's pure-bf16 mode).
"""

from colax import config


def get_config():
    return config.preset("fira", "350m")
