"""Projection kinds: one module per low-rank method, and their registry `PROJECTIONS`.

A projection kind is one class: it maps [..., in] -> [..., out], takes
`(in_features, out_features, rank, cfg, rngs)` (cfg: the model's spec, `model.ModelSpec`), states
its forward FLOPs per token and the logical axes of its parameters (for sharding). Everything else
a method needs it declares on that class, each optional (docs/methods.md#adding-the-next-method):
`frozen` / `full_rank_frozen` / `state_leaves` / `padding` (what the optimizer trains and what
`model.count_params` counts), `vector_steps` (leaf name -> axis: an Adam step count per vector of that
leaf, colax.row_adam, for kinds that reset chosen vectors; a run of a kind without it keeps
optax's `scale_by_adam`), `frozen_flops_per_token`, `first_layer` (cross-layer kinds), `invert`,
`hook` (between-steps changes, colax.hooks), `config` and `check_config` (its own `model.<key>`
config keys and their checks, collected by `config_defaults` and `model.spec_from_config`) and
`preset` (its adjustments of the paper's recipe in `colax.config.preset`). Adding a method means
one new module here, one line in `PROJECTIONS` and its configs/<kind>_<size>.py files.

A cross-layer kind (one with a `first_layer` attribute, e.g. CR-Net) also reads the same
projection's output in the previous block: the first block uses `first_layer` (another kind) in
its place, every later block calls `projection(x, prev)`, and `layers.Block` passes the seven
outputs on to the next block as its carry.
"""

from colax.projections.cola import CoLA
from colax.projections.crnet import CRNet
from colax.projections.dense import Dense
from colax.projections.lora import LoRA
from colax.projections.sltrain import SLTrain
from colax.projections.sst import SST
from colax.projections.switchlora import SwitchLoRA

PROJECTIONS = {"dense": Dense, "cola": CoLA, "sltrain": SLTrain, "crnet": CRNet, "lora": LoRA,
               "switchlora": SwitchLoRA, "sst": SST}


def config_defaults():
    """{key: default} of every kind's own model-section keys (its `config`), in registry order."""
    return {key: value for kind in PROJECTIONS.values() for key, value in getattr(kind, "config", {}).items()}
