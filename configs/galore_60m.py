"""GaLore on the paper's 60m full-rank LLaMA: the authors' recipe (colax.config.LOW_RANK_OPTIM).

Recipe source: jiaweizzhao/GaLore@2cc66f8 scripts/benchmark_c4/llama_60m.sh (lr 0.01, scale 0.25,
rank 128, T 200, weight decay 0, no clipping, 512 sequences of 256 tokens, 10k steps, 1k warmup,
cosine to 0.1 lr). One difference: the script's --dtype bfloat16 casts the weights to bf16; colax computes
in bf16 and keeps fp32 weights (--config.model.param_dtype=bfloat16 is the script's pure-bf16 mode).
"""

from colax import config


def get_config():
    return config.preset("galore", "60m")
