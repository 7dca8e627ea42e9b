"""The divergence guard: stops a run whose training has gone bad, with one line naming the step.

A step is bad when its loss, its gradient norm or the parameters after its update are not finite
(the train step's "finite" metric), or when its loss spikes more than `train.spike_nats` above the
median loss of the previous `train.spike_window` steps (0: off). The spike rule applies from a
run's second step on: until the window is full its median is that of the steps so far, so the first
blow-up is caught even in the first steps. Losses fall fast early on, and the median of the steps so
far then lies above the latest loss: the short window is more lenient, not less, while a blow-up
is far above it (configs/tiny.py at lr 10: 7.7, 7.7, 6.9, then 39.4 at step 4). Losses are logs, so a spike is measured
in nats, not as a factor: a model at the uniform loss ln V is a few nats above a trained one, never
3x. On resume the window starts from the losses that metrics.jsonl logged before the checkpoint
(`remember`), since a resume with changed recovery settings is exactly when a spike is likely.
`on_nonfinite="stop"` stops at the first non-finite step; `"skip"` (the step's update was discarded
on the device) stops after more than `train.max_skipped_steps` consecutive skipped steps. A spike
always stops.

A step's loss is computed from the parameters before its update, so a checkpoint is known to be
healthy only once a later step's loss, computed from its parameters, passed ("sound": finite loss and
gradient norm, no spike); until then it is unconfirmed. When the run stops on a step whose loss is not
sound, the unconfirmed checkpoint is the diverged model: `diverged` names it (the loop sets it aside,
`checkpoint.set_aside`), and the stop message points to the newest healthy checkpoint, or, when there
is none, says to start over. The healthy checkpoint at the first bad step is pinned: rotation never
deletes it (`pinned`; the loop stores the pin in the workdir, `on_pin`, `colax.run.write_pinned`, so
a restarted run keeps it too). With `train.keep_checkpoints` >= 2 the newest healthy checkpoint is
still kept when the unconfirmed one turns out diverged; `keep_checkpoints=1` rotates it out as soon as
the next one is saved.
"""

import collections
import math

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
        self.skipped = 0          # skipped steps since this process started
        self.consecutive = 0      # skipped steps in a row, up to the current one
        self.last_saved = None    # the newest checkpoint saved so far
        self.unconfirmed = None   # the newest checkpoint while no sound loss was computed from its parameters
        self.healthy = None       # the newest checkpoint whose parameters gave a sound loss
        self.diverged = None      # the checkpoint whose parameters gave the loss the run stopped on
        self.pinned = set(pinned)  # {the healthy checkpoint at the first bad step}: never rotated out
        self.on_pin = on_pin

    def resumed(self, start, steps):
        """The run resumes from checkpoint `start` with the checkpoints `steps` kept: the older ones
        were confirmed by the process that saved a newer one, `start` is not confirmed yet."""
        self.healthy = max((s for s in steps if s < start), default=None)
        self.saved(start)

    def saved(self, step):
        self.last_saved = self.unconfirmed = step

    def remember(self, losses):
        """Fills the spike window with earlier steps' `losses` (oldest first), e.g. those logged
        before the checkpoint a run resumes from."""
        self.recent.extend(losses)

    @property
    def in_streak(self):
        """Whether the last checked step was skipped as non-finite: its state must not be saved."""
        return self.consecutive > 0

    def _pin(self):
        """Pins the newest healthy checkpoint, unless one is pinned already."""
        if self.healthy is not None and not self.pinned:
            self.pinned.add(self.healthy)
            self.on_pin(self.pinned)

    def _stop(self, message):
        """`message` with the advice that works: the unconfirmed checkpoint gave the bad loss (`sound`
        False) and is marked `diverged`; resume from the pinned healthy one, else start over."""
        self.diverged, self.unconfirmed = self.unconfirmed, None
        self._pin()
        good = min(self.pinned, default=None)
        if good is None:
            return message + ("; no healthy checkpoint was saved before it: start over with --overwrite "
                              "(and e.g. a lower optim.lr)")
        return message + (f"; the last healthy checkpoint is {good}: resume from it with "
                          f"--config.train.resume_step={good} (and e.g. a lower optim.lr)")

    def _spike(self, step, loss):
        """The message if `loss` is more than `threshold` nats above the median of the window, else None."""
        if not (self.threshold and self.recent):
            return None
        median = float(np.median(self.recent))
        if loss <= median + self.threshold:
            return None
        return (f"step {step}: loss {loss:.4g} spiked more than {self.threshold:g} nats above the "
                f"median {median:.4g} of the previous {len(self.recent)} steps (train.spike_nats)")

    def check(self, step, m, finite):
        """m: step `step`'s {"loss", "grad_norm", ...} floats; finite: the step's update was finite."""
        spike = self._spike(step, m["loss"])
        sound = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not spike
        if sound and self.unconfirmed is not None:  # its parameters (a skipped step keeps them) gave this loss
            self.healthy, self.unconfirmed = self.unconfirmed, None
        if not finite:
            message = (f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}, or the updated "
                       f"parameters are not finite")
            if not self.skip:
                raise NonFiniteError(self._stop(message + " (train.on_nonfinite='stop')"))
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
            if self.consecutive > self.max_skipped:
                raise NonFiniteError(self._stop(
                    f"step {step}: {self.consecutive} non-finite steps in a row were skipped "
                    f"(train.max_skipped_steps={self.max_skipped})"))
            self._pin()
            return
        self.consecutive = 0
        if spike:
            raise DivergenceError(self._stop(spike))
        self.recent.append(m["loss"])
