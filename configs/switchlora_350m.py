"""350m SwitchLoRA (frozen W + LoRA whose vectors are switched for candidates on a schedule): the
size's model and the authors' 350M script, asfsdsf/SwitchLoRA@f9a174e:llama/examples/basic/run_switchlora_350m.sh
(lr 0.02, rank 256, 40k steps of 1152 x 512 tokens; warmup 100, clip 1.0, wd 0, cosine to 0 from llama/main.py:91-97); colax.projections.switchlora.SwitchLoRA.preset."""

from colax import config


def get_config():
    return config.preset("switchlora", "350m")
