"""The divergence guard: stops a run whose training has gone bad, with one line naming the step.

A step is bad when its loss, its gradient norm or the parameters after its update are not finite
(the train step's "finite" metric), or when its loss spikes more than `train.spike_nats` above the
median loss of the previous `train.spike_window` steps (checked once that window is full; 0: off).
Losses are logs, so a spike is measured in nats, not as a factor: a model at the uniform loss ln V
is a few nats above a trained one, never 3x. On resume the window starts from the losses that
metrics.jsonl logged before the checkpoint (`remember`), since a resume with changed recovery
settings is exactly when a spike is likely.
`on_nonfinite="stop"` stops at the first non-finite step; `"skip"` (the step's update was discarded
on the device) stops after more than `train.max_skipped_steps` consecutive skipped steps. A spike
always stops. The guard also tracks the last checkpoint saved before the first bad step: rotation
never deletes it (`pinned`), and the stop message names it as the place to resume from. The loop
stores the pin in the workdir (`on_pin`, `colax.run.write_pinned`), so a restarted run keeps it too.
"""

import collections

import numpy as np

from colax.errors import DivergenceError, NonFiniteError


class Guard:
    """check(step, metrics, finite) per step in order; saved(step) after each checkpoint save."""

    def __init__(self, cfg_train, pinned=(), on_pin=lambda pinned: None):
        """pinned: steps pinned by an earlier process of the run; on_pin(pinned) is called when a pin is added."""
        t = cfg_train
        self.skip, self.max_skipped = t.on_nonfinite == "skip", t.max_skipped_steps
        self.threshold = t.spike_nats
        self.recent = collections.deque(maxlen=t.spike_window)
        self.skipped = 0        # skipped steps since this process started
        self.consecutive = 0    # skipped steps in a row, up to the current one
        self.last_saved = None  # the newest checkpoint saved so far
        self.pinned = set(pinned)  # {the last checkpoint saved before the first bad step}: never rotated out
        self.on_pin = on_pin

    def saved(self, step):
        self.last_saved = step

    def remember(self, losses):
        """Fills the spike window with earlier steps' `losses` (oldest first), e.g. those logged
        before the checkpoint a run resumes from."""
        self.recent.extend(losses)

    @property
    def in_streak(self):
        """Whether the last checked step was skipped as non-finite: its state must not be saved."""
        return self.consecutive > 0

    def _bad(self, message):
        """Pins the last good checkpoint and returns `message` with a pointer to it."""
        if self.last_saved is not None and not self.pinned:
            self.pinned.add(self.last_saved)
            self.on_pin(self.pinned)
        good = min(self.pinned, default=None)
        return message + ("" if good is None else
                          f"; the last checkpoint before it is {good}: resume from it with "
                          f"--config.train.resume_step={good} (and e.g. a lower optim.lr)")

    def check(self, step, m, finite):
        """m: step `step`'s {"loss", "grad_norm", ...} floats; finite: the step's update was finite."""
        if not finite:
            message = (f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}, or the updated "
                       f"parameters are not finite")
            if not self.skip:
                raise NonFiniteError(self._bad(message + " (train.on_nonfinite='stop')"))
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            if self.consecutive > self.max_skipped:
                raise NonFiniteError(self._bad(
                    f"step {step}: {self.consecutive} non-finite steps in a row were skipped "
                    f"(train.max_skipped_steps={self.max_skipped})"))
            self._bad("")  # pins the last good checkpoint
            return
        self.consecutive = 0
        if self.threshold and len(self.recent) == self.recent.maxlen:
            median = float(np.median(self.recent))
            if m["loss"] > median + self.threshold:
                raise DivergenceError(self._bad(
                    f"step {step}: loss {m['loss']:.4g} spiked more than {self.threshold:g} nats above the "
                    f"median {median:.4g} of the previous {len(self.recent)} steps (train.spike_nats)"))
        self.recent.append(m["loss"])
