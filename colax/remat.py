"""Rematerialisation policies by name: what each decoder block keeps for the backward pass.

The model tags values with `jax.ad_checkpoint.checkpoint_name` (see `colax.layers` and
`colax.projections.cola`): "block_in" and "block_mid" (the block input and the residual after
attention, [B, T, D] each), and for every CoLA projection "cola_z" (x @ A) and "cola_h" (silu(z)), [B, T, R] each. Per token and block,
`cola_m` and `cola_m_paper` keep 2D + 7R values; everything else is recomputed in the backward.
`crnet` (CR-Net's scheme) is not a checkpoint policy but a custom VJP over the blocks,
`inverted_scan`. See docs/remat.md for measurements and which policy to pick.
"""

import jax
import jax.numpy as jnp
from jax import checkpoint_policies as cp

_RESIDUALS = ("block_in", "block_mid")


# CR-Net's scheme keeps the blocks' full cross-layer outputs at every EVERY-th layer and the last.
EVERY = 8


class Remat:
    """A named policy: `policy` is None for no checkpointing; `lowrank` if it needs CoLA tags;
    `offload` if it moves saved values to host memory; `inverts` if the blocks after the first run
    as `inverted_scan` (a cross-layer projection kind with `invert`; `policy` then applies to block 1)."""

    def __init__(self, policy, lowrank, doc, offload=False, inverts=False):
        self.policy, self.lowrank, self.doc, self.offload = policy, lowrank, doc, offload
        self.inverts = inverts


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
    "crnet": Remat(cp.nothing_saveable, True,
                   f"CR-Net's scheme: each block's input and seven x @ A, the seven outputs every {EVERY}th "
                   "block and the last; the others recovered backwards by inverting y = s(beta) prev + "
                   "x A B; recomputes each block once", inverts=True),
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


def packed_residuals(layer):
    """`layer(carry, (block_state, cache, key), positions, segment_ids) -> (carry', None)` with the
    same values and gradients, whose bf16 residuals are kept as their uint16 bits.

    Scanned blocks stack their residuals with a dynamic-update-slice per step; XLA:CPU 0.10 runs a
    bf16 one through f32 (float normalization: converts in the loop and of every stacked residual
    before the backward), a uint16 one as it is. Measured on a 60M bf16 step at 8 x 256 on jax 0.10:
    +4-25 % tok/s for CoLA and full-rank in three A/Bs (CoLA-M's few residuals: no change), temp
    memory 4.82 -> 2.76 GiB for CoLA without remat; no change on jax 0.12 (docs/cpu_performance.md).
    Gradients flow to carry and block_state; cache, key, positions and segment_ids get none.
    """
    treedef, dtypes = [], []  # of the forward's residuals, read back by the backward (static)

    @jax.custom_vjp
    def packed(carry, block_state, rest, positions, segment_ids):
        return layer(carry, (block_state, *rest), positions, segment_ids)

    def forward(carry, block_state, rest, positions, segment_ids):
        out, vjp = jax.vjp(lambda c, b: layer(c, (b, *rest), positions, segment_ids), carry, block_state)
        leaves, tree = jax.tree.flatten(vjp)
        treedef[:], dtypes[:] = [tree], [leaf.dtype for leaf in leaves]
        bits = [jax.lax.bitcast_convert_type(leaf, jnp.uint16) if leaf.dtype == jnp.bfloat16 else leaf
                for leaf in leaves]
        return out, bits

    def backward(bits, g):
        leaves = [jax.lax.bitcast_convert_type(leaf, dtype) if dtype == jnp.bfloat16 else leaf
                  for leaf, dtype in zip(bits, dtypes)]
        d_carry, d_state = jax.tree.unflatten(treedef[0], leaves)(g)
        return d_carry, d_state, None, None, None

    packed.defvjp(forward, backward)
    return lambda carry, block_layer, positions, segment_ids: packed(
        carry, block_layer[0], block_layer[1:], positions, segment_ids)


def segment_ends(num_layers):
    """Where `inverted_scan` segments end (exclusive indices into blocks 2..L, stacked from 0):
    after every EVERY-th block and the last, e.g. 24 layers -> [7, 15, 23]."""
    ends = [layer - 1 for layer in range(EVERY, num_layers, EVERY)]
    return ends + [num_layers - 1]


def inverted_scan(step, invert, carry, stacked, extra, ends, unroll=1):
    """`lax.scan` of `step` over stacked layers whose backward recovers the cross-layer carry by
    inversion instead of keeping it (CR-Net's memory scheme).

    carry = (x, ys): x the block input [B, T, D], ys what a block passes to the next (pytree).
    step(carry, params, extra) -> (carry', residuals); invert(params, ys', residuals) -> ys undoes
    step's update of ys. extra (positions, ...) gets no gradient. The layers are split into segments
    ending at `ends`; each is one custom VJP that keeps per layer x and the residuals, and ys only at
    its end; its backward walks the layers in reverse, recovering each ys from the next with
    `invert` and recomputing the layer's forward once for its VJP. Returns the final carry.
    """
    start = 0
    for end in ends:
        segment = jax.tree.map(lambda a, s=start, e=end: a[s:e], stacked)
        carry = _inverted_segment(step, invert, unroll)(carry, segment, extra)
        start = end
    return carry


def _inverted_segment(step, invert, unroll):
    """One segment of `inverted_scan`: (carry, params [n, ...], extra) -> carry, custom VJP."""

    @jax.custom_vjp
    def run(carry, params, extra):
        return jax.lax.scan(lambda c, p: (step(c, p, extra)[0], None), carry, params, unroll=unroll)[0]

    def fwd(carry, params, extra):
        def layer(c, p):
            out, residuals = step(c, p, extra)
            return out, (c[0], residuals)

        out, (xs, residuals) = jax.lax.scan(layer, carry, params, unroll=unroll)
        return out, (xs, residuals, out[1], params, extra)

    def bwd(saved, cotangent):
        xs, residuals, ys, params, extra = saved

        def layer(c, inputs):
            dx, dys, ys = c
            x, r, p = inputs
            prev = invert(p, ys, r)
            _, vjp = jax.vjp(lambda c_, p_: step(c_, p_, extra)[0], (x, prev), p)
            (dx, dprev), dp = vjp((dx, dys))
            return (dx, dprev, prev), dp

        (dx, dys, _), dparams = jax.lax.scan(layer, (*cotangent, ys), (xs, residuals, params), reverse=True,
                                             unroll=unroll)
        return (dx, dys), dparams, None

    run.defvjp(fwd, bwd)
    return run
