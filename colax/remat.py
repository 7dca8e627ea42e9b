"""Rematerialisation policies by name: what each decoder block keeps for the backward pass.

The model tags values with `jax.ad_checkpoint.checkpoint_name` (see `colax.layers`): "block_in"
and "block_mid" (the block input and the residual after attention, [B, T, D] each), and for every
CoLA projection "cola_z" (x @ A) and "cola_h" (silu(z)), [B, T, R] each.
"""

import jax
from jax import checkpoint_policies as cp

_RESIDUALS = ("block_in", "block_mid")


class Remat:
    """A named policy: `policy` is None for no checkpointing; `lowrank` if it needs CoLA tags."""

    def __init__(self, policy, lowrank, doc):
        self.policy, self.lowrank, self.doc = policy, lowrank, doc


POLICIES = {
    "none": Remat(None, False, "keep every intermediate (fastest, most memory)"),
    "full": Remat(cp.nothing_saveable, False, "keep only the block input; recompute the block"),
    "cola_m_paper": Remat(cp.save_only_these_names(*_RESIDUALS, "cola_h"), True,
                          "the reference CoLA-M: block input, mid residual, the seven silu(xA)"),
    "cola_m": Remat(cp.save_only_these_names(*_RESIDUALS, "cola_z"), True,
                    "block input, mid residual, the seven xA: no A matmul recomputed"),
    "cola_m_offload": Remat(
        cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[*_RESIDUALS, "cola_z"],
            offload_src="device", offload_dst="pinned_host"),
        True, "cola_m with the saved values in host memory (GPU/TPU)"),
}


def checkpointed(fn, name):
    """`fn` wrapped in `jax.checkpoint` with the policy called `name` (unwrapped for "none")."""
    policy = POLICIES[name].policy
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=True)
