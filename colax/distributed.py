"""The processes of a multi-host run: joining them, agreeing across them, and stopping all of them
with one line when one is lost.

`initialize` joins jax's distributed runtime (one process per host). A multi-process run then
keeps a `Watchdog`: every process sets a heartbeat counter in the coordination service's key-value
store each `period` seconds and reads its peers'. A peer whose counter has not moved for
`heartbeat_timeout` seconds (killed, hung, SIGSTOPped, its host gone), or a coordination service
that has not answered for as long (process 0 lost), stops this process at once, from the moment the
training loop starts (`watch`: start-up, e.g. training a tokenizer, may hold the GIL longer): one line naming
the lost process and the newest checkpoint on disk, exit code `LOST_HOST_EXIT_CODE`, no teardown
(`os._exit`: jax's own shutdown would wait for the lost peer). A process that stops on an error
records it in the store, and its peers stop with the same line instead of waiting in a collective.
jax's own heartbeat check, which aborts the process with a C++ stack trace, is given a longer
timeout so that the watchdog always speaks first.
"""

import atexit
import os
import re
import sys
import threading
import time
import traceback

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from colax.supervisor import LOST_HOST_EXIT_CODE, cluster_launch, newest_checkpoint

DEFAULT_HEARTBEAT_TIMEOUT = 30  # seconds without a peer's heartbeat before the run stops
_ALIVE, _EXIT = "colax/alive/", "colax/exit/"


def initialize(coordinator_address=None, num_processes=None, process_id=None, auto=False,
               heartbeat_timeout=DEFAULT_HEARTBEAT_TIMEOUT):
    """Joins the processes of a multi-host run; call first, before any other jax call.

    Explicit arguments (the --coordinator_address/--num_processes/--process_id flags) win. Else
    jax's cluster detection runs when `auto` is set (Cloud TPU pod slices, GKE, Kubernetes) or the
    environment is a multi-process launch (JAX_COORDINATOR_ADDRESS, SLURM srun with several tasks,
    Open MPI, multi-host TPU env vars). Else it is a single process and nothing happens.
    With several processes a `Watchdog` of `heartbeat_timeout` seconds starts (`watchdog()`).
    Returns (process_index, process_count).
    """
    if coordinator_address is not None or auto or cluster_launch():
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=2 * heartbeat_timeout + 30)
        if jax.process_count() > 1:
            global _WATCHDOG
            _WATCHDOG = Watchdog(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                                 heartbeat_timeout)
            _WATCHDOG.start()
    return jax.process_index(), jax.process_count()


_WATCHDOG = None


def watchdog():
    """The running `Watchdog` of this multi-process run, or None (a single process)."""
    return _WATCHDOG


class Watchdog:
    """Heartbeats of this process (`process_id` of `num_processes`) through the coordination
    service's key-value store (`client`), and the check of its peers' (module docstring)."""

    def __init__(self, client, process_id, num_processes, timeout, period=1.0):
        self.client, self.id, self.n, self.timeout, self.period = client, process_id, num_processes, timeout, period
        self.checkpoints = None  # the run's checkpoints folder, once known (`watch`)
        self.status = "an error, see its log"  # what `close` records: "ok" once the run ended normally
        now = time.monotonic()
        self.seen = {p: (None, now) for p in range(num_processes) if p != process_id}  # peer: (counter, when)
        self.answered = now      # the last time the store answered
        self.exits = {}          # peer: what it recorded when it stopped
        self.closed = threading.Event()
        self.judging = False     # peers are judged from `watch` on (start-up may hold the GIL: tokenizer training)

    def start(self):
        threading.Thread(target=self._beat, name="colax-heartbeat", daemon=True).start()
        threading.Thread(target=self._check, name="colax-watchdog", daemon=True).start()
        atexit.register(self.close)  # after jax's own atexit: runs first, before jax's shutdown barrier

    def watch(self, checkpoints=None):
        """From now on, a lost peer stops this process (before, only an error does: `verdict`);
        `checkpoints`: the run's checkpoints folder, named in the line a lost host prints."""
        self.checkpoints = checkpoints
        now = time.monotonic()
        self.seen = {peer: (count, now) for peer, (count, _) in self.seen.items()}
        self.answered = max(self.answered, now)
        self.judging = True

    def _beat(self):
        count = 0
        while not self.closed.is_set():
            try:
                self.client.key_value_set(f"{_ALIVE}{self.id}", str(count), allow_overwrite=True)
                alive, exits = (self._by_process(prefix) for prefix in (_ALIVE, _EXIT))
            except Exception:  # pylint: disable=broad-except  # the service is gone: `_check` times it out
                self.closed.wait(self.period)
                continue
            now = time.monotonic()
            self.answered = now
            for peer, value in alive.items():
                if peer in self.seen and self.seen[peer][0] != int(value):
                    self.seen[peer] = (int(value), now)
            self.exits = exits
            count += 1
            self.closed.wait(self.period)

    def _by_process(self, prefix):
        """{process index: value} of the store's keys `prefix`<index>."""
        return {int(key.rsplit("/", 1)[-1]): value for key, value in self.client.key_value_dir_get(prefix)}

    def lost(self):
        """(peer, why, lost) of the first peer that is lost (lost=True) or stopped on an error, or None."""
        now = time.monotonic()
        for peer, why in sorted(self.exits.items()):
            if peer != self.id and why != "ok":
                return peer, why, why.startswith("lost:")
        if now - self.answered > self.timeout and self.id != 0:
            return 0, f"(the coordinator) has not answered for {now - self.answered:.0f} s", True
        for peer, (_, when) in sorted(self.seen.items()):
            if peer not in self.exits and now - when > self.timeout:
                return peer, f"sent no heartbeat for {now - when:.0f} s (--heartbeat_timeout={self.timeout})", True
        return None

    def _check(self):
        while not self.closed.wait(self.period / 2):
            found = self.judging and self.lost()
            if found:
                self.stop(*found)

    def stop(self, peer, why, lost):
        """Prints one line (a lost peer, or a peer's error), records it for the other peers, and ends
        this process at once (`LOST_HOST_EXIT_CODE` for a lost peer, else 1)."""
        where = newest_checkpoint(self.checkpoints) if self.checkpoints else "no checkpoint was saved"
        if lost:
            why = why if why.startswith("lost:") else f"lost: process {peer} of {self.n} {why}"
            line = (f"{why.removeprefix('lost: ')}; the run stopped, {where}; relaunch every process with "
                    "the same command to resume (any host count)")
            self.record(why)
        else:
            line = f"process {peer} of {self.n} stopped on an error ({why}); the run stopped, {where}"
        sys.stdout.flush()
        print(f"error: lost host: {line}" if lost else f"error: {line}", file=sys.stderr, flush=True)
        os._exit(LOST_HOST_EXIT_CODE if lost else 1)

    def record(self, status):
        """Stores this process's end for its peers (`lost` reads it): "ok", an error, a lost peer."""
        try:
            self.client.key_value_set(f"{_EXIT}{self.id}", status, allow_overwrite=True)
        except Exception:  # pylint: disable=broad-except  # the service is gone: the peers time out instead
            pass

    def verdict(self, wait):
        """After an error in this process: waits up to `wait` seconds until every peer has sent two
        more heartbeats (alive: the error is this process's own, returns; one more could be the last
        of a peer that has just died) or one is lost (`stop`)."""
        start, before = time.monotonic(), {peer: count for peer, (count, _) in self.seen.items()}
        while time.monotonic() - start < wait:
            found = self.lost()
            if found and found[2]:
                self.stop(*found)
            if all(peer in self.exits or (count or 0) >= (before[peer] or 0) + 2
                   for peer, (count, _) in self.seen.items()):
                return
            time.sleep(self.period / 4)

    def close(self):
        """Records this process's end (`status`: "ok" if the run ended normally) and stops the heartbeats."""
        if not self.closed.is_set():
            self.closed.set()
            self.record(self.status)


def on_error(error):
    """Called where an exception ends a multi-process run, before it is reported: if a peer was
    lost, that is the cause (the lost-host line, `Watchdog.stop`); else `error` is recorded for the
    peers, which stop with a line naming this process and its error."""
    dog = watchdog()
    if dog is not None:
        dog.verdict(dog.timeout + 2 * dog.period)
        dog.status = re.sub(r"\s+", " ", f"{type(error).__name__}: {error}")[:300]
        dog.record(dog.status)


def on_success():
    """Called when the run ended normally: its peers do not wait for this process's heartbeats."""
    dog = watchdog()
    if dog is not None:
        dog.status = "ok"


def end_directly(main):
    """Wraps a CLI's `main` (outside `errors.exit_on_error`): in a multi-process run, an exit on an
    error (a non-zero SystemExit, or any other exception, printed with its traceback) ends the
    process with `os._exit` once its peers could read its status, skipping jax's shutdown barrier,
    which would wait for peers that are stopping too."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit as e:
            if watchdog() is None or not e.code:
                raise
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # pylint: disable=broad-except
            if watchdog() is None:
                raise
            traceback.print_exc()
            code = 1
        dog = watchdog()
        dog.close()
        time.sleep(2 * dog.period)  # the peers read this process's status
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return wrapped


def any_process(flag):
    """Whether `flag` (bool) is set on any process; a collective (every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def global_sum(x):
    """The sum over processes of this process's numpy array `x` (same shape and dtype everywhere;
    int32 or float32 travel exactly); a collective."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)
