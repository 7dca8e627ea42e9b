"""Training metrics: MFU, the metrics.jsonl file, TensorBoard events and the progress display.

MFU = flops_per_token * tokens_per_s / (peak FLOP/s per device * devices), with the analytic
training FLOPs per token of `colax.model.flops_per_token` (3 x forward matmul FLOPs less frozen weights' weight gradients; remat
recomputation is not counted) and the dense bf16 peak of the device kind (None where unknown,
e.g. CPU).
"""

import json
import math
import sys
import time

import jax
import tqdm
from etils import epath

from colax import errors
from colax import workdir as workdir_lib


def _import_summary_writer():
    """tensorboardX's SummaryWriter, imported with torch hidden where torch is installed but not yet
    imported: tensorboardX imports torch only to accept torch tensors (colax logs Python floats),
    and that import costs every training process ~4 s of CPU at start (the `parity` extra installs
    torch). A later `import torch` works as usual."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

# Dense bf16 peak FLOP/s per device, by a substring of `jax.devices()[0].device_kind` (first match).
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12),
              ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12))


def peak_flops(device_kind):
    """The per-device peak of PEAK_FLOPS for a device kind string, or None."""
    return next((peak for name, peak in PEAK_FLOPS if name in device_kind), None)


def mfu(flops_per_token, tokens_per_s, devices=None):
    """Model FLOPs utilisation in [0, 1], or None on devices without a known peak (CPU)."""
    devices = jax.devices() if devices is None else devices
    peak = peak_flops(devices[0].device_kind)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * len(devices))


def _json_value(x):
    """Floats for JSON; NaN and inf as null (metrics.jsonl stays strict JSON)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _records_up_to(path, start):
    """The lines of metrics.jsonl at `path` of steps <= `start`; a torn line (a run killed while
    writing it) is dropped."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            print(f"{path}: dropping an unreadable line: {line[:60]!r}", flush=True)
            continue
        if step <= start:
            kept.append(line)
    return kept


def logged_losses(workdir, start):
    """The losses metrics.jsonl in `workdir` logged for steps <= `start`, oldest first (none: [])."""
    path = epath.Path(workdir) / "metrics.jsonl"
    records = (json.loads(line) for line in _records_up_to(path, start)) if path.exists() else ()
    return [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]


class Writer:
    """Appends one JSON object per call to workdir/metrics.jsonl and its numbers as TensorBoard
    scalars to workdir/tensorboard/ (process 0 only).

    On resume from step `start`, lines of later steps (logged after the last checkpoint) are dropped.
    """

    def __init__(self, workdir, start):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self.tensorboard = None
        if self.active:
            self.tensorboard = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=start + 1)
            if self.path.exists():
                workdir_lib.atomic_write(self.path, "".join(line + "\n" for line in _records_up_to(self.path, start)))

    def write(self, record):
        """record: {"step": int, name: number or None, ...}. RunFileError if a file cannot be written."""
        if self.active:
            record = {k: _json_value(v) for k, v in record.items()}
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise errors.RunFileError(f"{self.path} could not be written: {errors.cause(e)}") from None
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(name, value, record["step"])

    def close(self, stopping_on_error=False):
        """Flushes and closes the TensorBoard events: RunFileError if they cannot be written (a full
        disk), unless the run is `stopping_on_error` already (that error is the one reported). A
        writer that failed is abandoned quietly: no retry at exit, no error from its thread."""
        if not self.tensorboard:
            return
        try:
            self.tensorboard.close()
        except OSError as e:
            _abandon(self.tensorboard)
            if not stopping_on_error:
                raise errors.RunFileError(f"TensorBoard events in {self.tensorboard.logdir} could not be written: "
                                          f"{errors.cause(e)}") from None


def _abandon(tensorboard):
    """Marks tensorboardX's event writers closed (their exit hook then does nothing) and stops their
    threads without the flush that failed."""
    for file_writer in (tensorboard.all_writers or {}).values():
        events = file_writer.event_writer
        events._closed = True  # pylint: disable=protected-access
        worker = events._worker  # pylint: disable=protected-access
        if worker is not None:
            worker._queue.put(worker._shutdown_signal)  # pylint: disable=protected-access
            worker.join(timeout=5)


class Progress:
    """Step, loss, tokens/s, validation loss and perplexity (on evaluation steps) and ETA: a tqdm bar on
    a terminal, else one plain line every `every_s`, at every evaluation and at the last step.

    The ETA is the mean step time since the first step this process reported (so the compilation of
    the first step is left out) times the steps left; "-" until a second step was reported.
    """

    def __init__(self, start, total, every_s=30.0):
        self.tty = sys.stderr.isatty() and jax.process_index() == 0
        self.bar = tqdm.tqdm(total=total, initial=start, disable=not self.tty, dynamic_ncols=True,
                             unit="step", file=sys.stderr,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.total, self.every_s, self.last_print = total, every_s, -math.inf
        self.first = None  # (time, step) of the first step reported

    def eta(self, step):
        """Seconds left at the steady-state step time, or None (the first step reported)."""
        now = time.time()
        if self.first is None:
            self.first = (now, step)
        if step == self.first[1]:
            return None
        return (now - self.first[0]) / (step - self.first[1]) * (self.total - step)

    def update(self, step, loss, tokens_per_s, evaluation=None):
        """Called once per step with that step's loss, the latest throughput (None: unknown) and, on
        evaluation steps, {"eval_loss": float, "eval_ppl": float}."""
        eta = self.eta(step)
        parts = [f"loss {loss:.4f}", f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "- tok/s"]
        if evaluation:
            parts.append(f"val loss {evaluation['eval_loss']:.4f} ppl {evaluation['eval_ppl']:.2f}")
        parts.append(f"ETA {'-' if eta is None else tqdm.tqdm.format_interval(eta)}")
        line = f"step {step}/{self.total}  " + "  ".join(parts)
        if self.tty:
            self.bar.set_postfix_str(", ".join(parts), refresh=False)
            self.bar.update(step - self.bar.n)
            if evaluation:
                self.bar.write(line, file=sys.stderr)
        elif jax.process_index() == 0 and (evaluation or step == self.total
                                           or time.time() - self.last_print >= self.every_s):
            print(line, flush=True)
            self.last_print = time.time()

    def write(self, line):
        """Prints a line (process 0) without breaking the bar."""
        if jax.process_index() == 0:
            self.bar.write(line, file=sys.stdout)

    def close(self):
        self.bar.close()
