"""130M ReLoRA (LoRA with a full-rank warm start, merges every K steps, jagged cosine); colax.config.preset.

Recipe: Guitaricet/relora README.md:52-88 (the 250M warm start and ReLoRA runs) in proportion to the
steps: a T/4 warm start at lr 5e-4 with a T/20 warmup, then lr 1e-3, a fresh T/40 warmup, merges every
T/4, 100-step re-warmups, optimizer state reset; torchrun_main.py's weight decay 0, clip 1.0,
lora_dropout 0.1. Rank (the size's, as in the GaLore/CoLA comparison tables), steps T and batch: the
same as every other method in compare.py."""

from colax import config


def get_config():
    return config.preset("relora", "130m")
