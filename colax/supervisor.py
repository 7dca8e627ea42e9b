"""A multi-host process under a supervisor, so that losing the coordinator is one line too.

jax's distributed runtime ends a process whose coordination service (hosted by process 0) is gone
with a C++ abort (a FATAL log line, a stack trace, Python's fault handler dump, exit code 134), and
no Python code can run first: the abort comes from the runtime's own error-polling thread the
moment the connection closes. So in a multi-process launch train.py runs itself again as a child
(`supervise`, before it imports jax) and relays the child's stderr, holding back the runtime's
log lines and what follows them for `HOLD_S` seconds (the errors that precede its FATAL line): from a
FATAL line of jax's runtime on, it prints nothing of the child's, and once the child has ended it
prints one line naming the lost coordinator and the newest checkpoint, and exits with
`LOST_HOST_EXIT_CODE`. Any
other end of the child is passed on as it is (its exit code; 128 + N for a signal N).

The child runs in a session of its own and dies with its supervisor (Linux's parent-death signal):
SIGTERM and SIGINT sent to the supervisor are passed to the child once; kill -9 of the supervisor
kills the child. Imports no jax.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from etils import epath

from colax import host

CHILD_ENV = "COLAX_SUPERVISED"  # set in the child: it is not supervised again
LOST_HOST_EXIT_CODE = 75  # EX_TEMPFAIL: relaunching every process resumes the run
_RUNTIME_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")  # the C++ runtime's log lines (absl's format)
_FATAL = re.compile(r"^F\d{4} .*(JAX distributed service|coordination service)")
HOLD_S = 2.0  # the runtime's log lines (and the lines after them) are held this long: a FATAL line may follow


def _write(data):
    sys.stderr.buffer.write(data)
    sys.stderr.flush()


def cluster_launch():
    """Whether the environment is a multi-process launch that jax can join by itself."""
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
            or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def newest_checkpoint(checkpoints):
    """A phrase naming the newest complete checkpoint folder (all-digit name) in `checkpoints`."""
    try:
        steps = [int(p.name) for p in epath.Path(checkpoints).iterdir() if p.name.isdigit()]
    except OSError:
        steps = []
    return f"the last good checkpoint is {epath.Path(checkpoints) / str(max(steps))}" if steps else \
        "no checkpoint was saved"


def _flag(argv, name):
    """The value of --name=V or --name V in `argv`, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _multi_process(argv):
    """Whether train.py's `argv` (flags) start one process of several: --num_processes > 1, or
    without it --distributed or a cluster launch's environment."""
    count = _flag(argv, "num_processes")
    if count is not None:
        return count.isdigit() and int(count) > 1
    return "--distributed" in argv or "--distributed=true" in argv or cluster_launch()


def _read(pipe, lines):
    """Puts each line of `pipe` on the queue `lines`, then None."""
    for line in iter(pipe.readline, b""):
        lines.put(line)
    lines.put(None)


def _relay(child):
    """Relays the child's stderr until it closes (module docstring); returns the runtime's FATAL
    line (str), or None."""
    lines = queue.Queue()
    threading.Thread(target=_read, args=(child.stderr, lines), daemon=True).start()
    fatal, held = None, []  # held: (arrival, line) from a log line of the runtime on, for HOLD_S seconds
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = b""
        if line is None:
            break
        now, text = time.monotonic(), line.decode(errors="replace")
        fatal = fatal or (text if _FATAL.match(text) else None)
        if fatal is None and line and (held or _RUNTIME_LOG.match(text)):
            held.append((now, line))
        elif fatal is None and line:
            _write(line)
        if fatal is None and held and now - held[0][0] > HOLD_S:
            _write(b"".join(line for _, line in held))
            held = []
    if fatal is None and held:
        _write(b"".join(line for _, line in held))
    return fatal


def _lost_line(fatal, workdir):
    """The one line for a child that jax's runtime stopped with the FATAL line `fatal`."""
    status = re.search(r"absl::Status: ([^.\n]*)", fatal)
    who = "process 0 (the coordinator)" if re.search(r"RPC to coordination service|leader task", fatal) else \
        "a peer process"
    where = newest_checkpoint(epath.Path(workdir) / "checkpoints") if workdir else "no checkpoint was saved"
    return (f"error: lost host: {who} is gone, and jax's distributed runtime stopped this process "
            f"({status.group(1) if status else 'no status'}); the run stopped, {where}; relaunch every process "
            "with the same command to resume (any host count)")


def supervise(argv=None):
    """Runs this command (`argv`, default sys.argv) as a supervised child and exits with its exit
    code, in a multi-process launch that is not the child already; else returns at once."""
    argv = sys.argv if argv is None else argv
    if os.environ.get(CHILD_ENV) or not _multi_process(argv[1:]):
        return
    child = subprocess.Popen([sys.executable, *argv], env=dict(os.environ, **{CHILD_ENV: "1"}),
                             stderr=subprocess.PIPE, start_new_session=True, preexec_fn=host.die_with_parent)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: child.send_signal(signum))
    fatal = _relay(child)
    rc = child.wait()
    if fatal is not None:
        print(_lost_line(fatal, _flag(argv[1:], "workdir")), file=sys.stderr, flush=True)
        sys.exit(LOST_HOST_EXIT_CODE)
    sys.exit(rc if rc >= 0 else 128 - rc)
