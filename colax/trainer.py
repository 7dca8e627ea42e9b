"""One optimizer step after another: training phases and the method's between-steps hook.

`Trainer(cfg, graphdef, mesh)(s, params, opt_state, batches)` runs optimizer step s (1, 2, ...) of
the phase it belongs to (before step 1 the hook at s = 0, where due), then the projection kind's
hook where due (`colax.hooks`), then, after
the last step of the full-rank warm start (`optim.full_rank_steps`), the switch to the low-rank
phase. The trainable mask is static within a phase (`model.trainable_mask(params, full_rank)`), so
each phase has its own optimizer (`optim.make(..., full_rank)`) and jitted step, compiled once when
first used. At the switch the low-rank phase's optimizer starts fresh (`tx.init`: zero moments and
step counts, so its schedule counts from the switch), as ReLoRA's `--warmed_up_model` run restores
no optimizer or scheduler state. A dropout PRNG key (`model.uses_rng`) is `dropout_key(seed, s)`.
Hook and switch run jitted with the state's shardings, params and opt_state donated.
"""

import jax
import jax.numpy as jnp

from colax import hooks, optim, projections, state, step
from colax import model as model_lib


def hook_of(cfg):
    """The between-steps hook of `cfg`'s projection kind (`kind.hook(cfg)`), or None."""
    kind = projections.PROJECTIONS[cfg.model.projection]
    return kind.hook(cfg) if hasattr(kind, "hook") else None


def dropout_key(seed, s):
    """The PRNG key of optimizer step s's dropout (a stream apart from the init's and the hooks')."""
    return jax.random.fold_in(jax.random.key(seed + 2), s)


class Trainer:
    """Advances (params, opt_state) by one optimizer step, its hook and any phase switch."""

    def __init__(self, cfg, graphdef, mesh):
        self.cfg, self.graphdef, self.mesh = cfg, graphdef, mesh
        self.hook = hook_of(cfg)
        self.rng = model_lib.uses_rng(model_lib.spec_from_config(cfg.model))
        self.compiled = {}

    def full_rank(self, s):
        """Whether the state after s optimizer steps is in the full-rank warm-start phase."""
        return s < self.cfg.optim.full_rank_steps

    def tx(self, s):
        """The optimizer of the state after s optimizer steps."""
        return optim.make(self.cfg.optim, self.cfg.train.steps, full_rank=self.full_rank(s),
                          projection=self.cfg.model.projection)

    def _compiled(self, name, make):
        if name not in self.compiled:
            self.compiled[name] = make()
        return self.compiled[name]

    def __call__(self, s, params, opt_state, batches):
        """Optimizer step s on `batches` ([A, B, T] micro-batches) -> (params, opt_state, metrics)."""
        full_rank = self.full_rank(s - 1)
        train_step = self.jitted_step(full_rank, params, opt_state)
        key = (dropout_key(self.cfg.train.seed, s),) if self.rng else ()
        if s == 1:
            params, opt_state = self._hook(0, full_rank, params, opt_state)
        params, opt_state, metrics = train_step(params, opt_state, batches, *key)
        params, opt_state = self._hook(s, full_rank, params, opt_state)
        if s == self.cfg.optim.full_rank_steps:
            opt_state = self._switch(params, opt_state)
        return params, opt_state, metrics

    def jitted_step(self, full_rank, params, opt_state):
        """The jitted training step of a phase (`state.jit_train_step`), made once when first asked for;
        `params`, `opt_state`: the state (or its ShapeDtypeStructs) whose tree structure it takes.
        `colax.plan --topology` lowers this very step for a TPU topology."""
        s = 0 if full_rank else self.cfg.optim.full_rank_steps  # a step of the phase
        return self._compiled(("step", full_rank), lambda: state.jit_train_step(
            step.make_train_step(self.graphdef, self.tx(s), self.cfg.train.on_nonfinite == "skip",
                                 full_rank=full_rank), params, opt_state, self.mesh, rng=self.rng))

    def _hook(self, s, full_rank, params, opt_state):
        """(params, opt_state) after the hook at s (s optimizer steps done), where due."""
        if self.hook is None or not self.hook.due(s):
            return params, opt_state
        apply = self._compiled(("hook", full_rank), lambda: state.jit_hook(self.hook.apply, params, opt_state,
                                                                            self.mesh))
        return apply(jnp.int32(s), params, opt_state, hooks.hook_key(self.cfg.train.seed, s))

    def _switch(self, params, opt_state):
        """The low-rank phase's fresh optimizer state (the warm start's, `opt_state`, is dropped)."""
        del opt_state
        tx = self.tx(self.cfg.optim.full_rank_steps)
        new = jax.eval_shape(tx.init, params)
        switch = jax.jit(tx.init, in_shardings=(state.tree_shardings(params, self.mesh),),
                         out_shardings=state.tree_shardings(new, self.mesh))
        return switch(params)
