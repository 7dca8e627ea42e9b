"""SLTrain 130M (Han et al., 2024): sparse plus low-rank projections on the paper's 130M LLaMA.

Recipe source: andyjm3/SLTrain@2335d62 scripts/llm_pretrain/sltrain130m.sh (size, rank, alpha, lr 0.003,
no weight decay, no clipping, steps and warmup, 512 x 256 tokens; colax.projections.sltrain).
One difference: the script's --dtype bfloat16 casts the weights to bf16; colax keeps fp32 weights as
in every other config (--config.model.param_dtype=bfloat16 for the script's pure-bf16 mode).
"""

from colax import config


def get_config():
    return config.preset("sltrain", "130m")
