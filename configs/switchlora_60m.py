"""60m SwitchLoRA (frozen W + LoRA whose vectors are switched for candidates on a schedule): the
size's model and the authors' 350M script's optimizer settings, asfsdsf/SwitchLoRA@f9a174e:llama/examples/basic/run_switchlora_350m.sh
(lr 0.02, warmup 100, clip 1.0, wd 0, cosine to 0); rank, steps, batch and sequence length are the size's:
the authors ship no script at 60m; colax.projections.switchlora.SwitchLoRA.preset."""

from colax import config


def get_config():
    return config.preset("switchlora", "60m")
