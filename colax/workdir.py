"""One writer per folder: a lock file, and atomic writes of the folder's files.

`lock(workdir)` holds `workdir/lock` for the life of a run: an exclusive `fcntl.flock` on the
file, which the kernel releases when the process ends in any way (kill -9 included), and the
holder's host, pid, start time and command as JSON for the message a second writer gets. Every
command that writes into a workdir or a data folder holds it: train.py, `colax.convert import`,
`colax.data prepare` (on its --out). A lock file left by a process that died is stale: its flock
is free, and the next run takes it over. Object stores
(`gs://`, `s3://`) have no flock: there the lock is skipped (one process 0 per run is the user's
job). `atomic_write` replaces a file by writing a temporary file beside it and renaming it, so a
reader sees the old or the new content, never a torn one.
"""

import contextlib
import fcntl
import json
import os
import socket
import time

import jax
from etils import epath

from colax.errors import ConfigError

LOCK_NAME = "lock"


def note(line):
    """Prints a line about the workdir (process 0 only)."""
    if jax.process_index() == 0:
        print(line, flush=True)


def atomic_write(path, data):
    """Writes `data` (str or bytes) to `path` through a temporary file and a rename."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _holder(path):
    """(command, "pid ... on host, started ...") of the lock file's holder (best effort)."""
    try:
        info = json.loads(path.read_text())
        return info.get("command", "run"), f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "process", "it left no description"


@contextlib.contextmanager
def lock(workdir, enabled=True, command="run", flag="--workdir"):
    """Holds `workdir/lock` (creating `workdir`) while the body runs; ConfigError naming the holder
    if another process has it, or if the workdir cannot be written. A workdir this call created
    and that is still empty at the end (a run refused by a later check) is removed again.
    Does nothing unless `enabled` (the other processes of a multi-host run), or on an object store.
    `command` ("run", "convert import", "prepare") is told to a process refused; `flag` is the
    option that names the folder ("--workdir", "--out"), in the messages.
    """
    workdir = epath.Path(workdir)
    if not enabled or "://" in str(workdir):  # an object store: no flock
        yield
        return
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(workdir / LOCK_NAME, command, flag)
    except OSError as e:
        raise ConfigError(f"{_name(flag)} {workdir} cannot be written ({e.strerror or type(e).__name__})") from None
    try:
        yield
    finally:
        (workdir / LOCK_NAME).unlink(missing_ok=True)
        os.close(fd)
        if created and not any(workdir.iterdir()):
            workdir.rmdir()


def _name(flag):
    """How messages name the folder of `flag`: "workdir" for --workdir, else the flag ("--out")."""
    return "workdir" if flag == "--workdir" else flag


def _acquire(path, command, flag):
    """An open fd of `path` holding its exclusive flock, with this process (running `command`) described in it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("{} {} is in use by another {} ({}); stop it or use another {}".format(
                _name(flag), path.parent, *_holder(path), flag)) from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder released and removed the file in between: lock the new one
    if os.fstat(fd).st_size:
        print("{} {}: taking over the lock of a {} that ended without releasing it ({})".format(
            _name(flag), path.parent, *_holder(path)), flush=True)
    info = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                command=command)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd
