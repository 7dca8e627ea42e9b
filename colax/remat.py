"""Rematerialisation policies by name: what each decoder block keeps for the backward pass.

The model tags values with `jax.ad_checkpoint.checkpoint_name` (see `colax.layers`): "block_in"
and "block_mid" (the block input and the residual after attention, [B, T, D] each), and for every
CoLA projection "cola_z" (x @ A) and "cola_h" (silu(z)), [B, T, R] each. Per token and block,
`cola_m` and `cola_m_paper` keep 2D + 7R values; everything else is recomputed in the backward.
See docs/remat.md for measurements and which policy to pick.
"""

import jax
from jax import checkpoint_policies as cp

_RESIDUALS = ("block_in", "block_mid")


class Remat:
    """A named policy: `policy` is None for no checkpointing; `lowrank` if it needs CoLA tags;
    `offload` if it moves saved values to host memory."""

    def __init__(self, policy, lowrank, doc, offload=False):
        self.policy, self.lowrank, self.doc, self.offload = policy, lowrank, doc, offload


POLICIES = {
    "none": Remat(None, False, "keep every intermediate (fewest FLOPs, most memory)"),
    "full": Remat(cp.nothing_saveable, False, "keep only the block input; recompute the whole block"),
    "cola_m_paper": Remat(cp.save_only_these_names(*_RESIDUALS, "cola_h"), True,
                          "the reference CoLA-M: block input, mid residual, the seven silu(xA); "
                          "recomputes the seven A matmuls, the q, k, v, gate, up B matmuls and attention"),
    "cola_m": Remat(cp.save_only_these_names(*_RESIDUALS, "cola_z"), True,
                    "block input, mid residual, the seven xA: recomputes only the q, k, v, gate, up "
                    "B matmuls and attention"),
    "cola_m_offload": Remat(
        cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[*_RESIDUALS, "cola_z"],
            offload_src="device", offload_dst="pinned_host"),
        True, "cola_m with the saved values in pinned host memory (a GPU/TPU feature)", offload=True),
}


def checkpointed(fn, name, prevent_cse=True):
    """`fn` wrapped in `jax.checkpoint` with the policy called `name` (unwrapped for "none").

    Inside `lax.scan` pass prevent_cse=False: the loop already keeps XLA from merging the
    backward's recomputation with the forward, and the barriers would only block fusion.
    """
    policy = POLICIES[name].policy
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)
