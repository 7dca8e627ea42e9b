"""60M LoRA (frozen full weight + trained rank-r factors, no merges); colax.config.preset.

Recipe: the authors' LoRA settings in Guitaricet/relora torchrun_main.py (weight decay 0, clip 1.0,
lora_dropout 0.1, alpha 32; `LoRA.preset`) at the README's ReLoRA lr 1e-3 (README.md:75). Rank
(the size's, as in the GaLore/CoLA comparison tables), steps, warmup and batch: the same as every
other method in compare.py."""

from colax import config


def get_config():
    return config.preset("lora", "60m")
