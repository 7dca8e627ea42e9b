"""What benchmarks/cpu_step.py and benchmarks/torch_step.py share, importing neither jax nor torch:
the tokens, the timing loop and its JSON lines, the machine's description.

A timed process prints one JSON object a line: one per step of the timed steps
({"side", "row", "dtype", "step", "seconds", "loss"}), then a summary ({"summary": true, the same
row keys, "samples": [seconds ...], "median", "first_loss": the loss of the first step run, warm-up
included, and the side's settings}).
"""

import json
import math
import os
import platform
import statistics
import time

import numpy as np

ATTENTION = ("sdpa", "eager")  # the torch side's attention kernels: torch's fused one, the explicit softmax


def random_tokens(vocab, batch, seq_len, seed=0):
    """Uniform random int32 [batch, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)


def timed_steps(run, warmup, steps, label):
    """(first loss, [(seconds, loss) of each of `steps` timed steps]): `warmup` untimed steps of `run`
    (a function running one step to completion, returning its loss), then the timed ones; `label`
    names the row and side in the error a non-finite loss stops the benchmark with."""
    losses, samples = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = run()
        seconds = time.perf_counter() - start
        losses.append(loss)
        if not math.isfinite(loss):
            raise SystemExit(f"{label}: non-finite loss {loss}")
        if i >= warmup:
            samples.append((seconds, loss))
    return (losses[0] if losses else None), samples


def emit(record):
    """Prints `record` as one JSON line, flushed (the parent reads it as it comes)."""
    print(json.dumps(record), flush=True)


def report(run, warmup, steps, keys, settings):
    """Times `run` (`timed_steps`) and prints every timed step's line, then the summary: `keys`
    {"side", "row", "dtype"} in every line, `settings` (threads, versions, malloc ...) in the summary.
    Returns the summary."""
    first, samples = timed_steps(run, warmup, steps, f"{keys['row']} {keys['side']}")
    for i, (seconds, loss) in enumerate(samples):
        emit(dict(keys, step=i, seconds=seconds, loss=loss))
    times = [seconds for seconds, _ in samples]
    summary = dict(keys, summary=True, samples=times, median=statistics.median(times), first_loss=first, **settings)
    emit(summary)
    return summary


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), or the machine type where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def load_average():
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]
