"""Multi-host start-up, the heartbeat watchdog and the supervisor, in one process with a fake
coordination service (the real processes: tests/test_multihost.py)."""

import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from colax import checkpoint, data, distributed, supervisor
from colax.errors import ConfigError
from test_data import CharTokenizer, _cfg

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # fake os._exit


def test_single_process_needs_no_distributed_init(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: pytest.fail("initialize called"))
    assert distributed.initialize() == (0, 1)
    assert distributed.watchdog() is None


@pytest.mark.parametrize("env, args", [
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]"}, ()),
    ({}, ("10.0.0.1:1234", 2, 1)),
])
def test_multi_process_launch_initializes_with_a_longer_jax_heartbeat(monkeypatch, env, args):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    distributed.initialize(*args, heartbeat_timeout=7)
    # jax's own check (a C++ abort) must come after the watchdog's line
    assert calls == [(args + (None,) * (3 - len(args)), {"heartbeat_timeout_seconds": 44})]


class FakeClient:
    """The coordination service's key-value store, as jax's DistributedRuntimeClient serves it."""

    def __init__(self):
        self.store, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        assert allow_overwrite or key not in self.store
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


class Stopped(Exception):
    pass


@pytest.fixture
def exits(monkeypatch, capsys):
    """The exit codes `os._exit` was called with (raised as Stopped in the calling thread)."""
    codes = []

    def fake_exit(code):
        codes.append(code)
        raise Stopped

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    return codes


def _beat(peer, client, count):
    client.key_value_set(f"colax/alive/{peer}", str(count), allow_overwrite=True)


def _beats(peer, client, counts, period):
    for count in counts:
        _beat(peer, client, count)
        time.sleep(period)


def test_a_peer_without_heartbeats_is_lost_after_the_timeout(exits, capsys, tmp_path):
    client = FakeClient()
    dog = distributed.Watchdog(client, 0, 3, timeout=1.5, period=0.1)
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp").mkdir()
    dog.watch(tmp_path / "checkpoints")
    dog.start()
    try:
        for count in range(8):  # peer 2 beats, peer 1 never does after its first
            _beat(2, client, count)
            if count == 0:
                _beat(1, client, 0)
            time.sleep(0.1)
            assert not exits, "stopped before the timeout"
        deadline = time.monotonic() + 3
        while not exits and time.monotonic() < deadline:
            _beat(2, client, 100 + len(exits))
            time.sleep(0.05)
    finally:
        dog.closed.set()
    assert exits == [distributed.LOST_HOST_EXIT_CODE]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lost host: process 1 of 3 sent no heartbeat for ") and err.endswith(
        f"the run stopped, the last good checkpoint is {tmp_path / 'checkpoints' / '4'}; relaunch every process "
        "with the same command to resume (any host count)"), err
    assert client.store["colax/exit/0"].startswith("lost: process 1 of 3 sent no heartbeat")  # for the others


def _watch(client, process_id, timeout, seconds):
    """A Watchdog of process `process_id` of 2 over `client`, running for `seconds`."""
    dog = distributed.Watchdog(client, process_id, 2, timeout=timeout, period=0.1)
    dog.watch()
    dog.start()
    try:
        time.sleep(seconds)
    finally:
        dog.closed.set()


def test_a_peer_that_stopped_on_an_error_stops_the_others_with_its_error(exits, capsys):
    client = FakeClient()
    client.key_value_set("colax/exit/0", "CheckpointError: checkpoint 6 could not be saved: disk full")
    _watch(client, 1, timeout=30, seconds=0.5)
    assert exits == [1]
    assert capsys.readouterr().err.strip() == (
        "error: process 0 of 2 stopped on an error (CheckpointError: checkpoint 6 could not be saved: disk full); "
        "the run stopped, no checkpoint was saved")


def test_a_peer_that_ended_normally_is_not_lost(exits):
    client = FakeClient()
    client.key_value_set("colax/exit/1", "ok")
    _watch(client, 0, timeout=0.3, seconds=0.8)
    assert not exits


def test_the_coordinator_that_stops_answering_is_lost(exits, capsys):
    client = FakeClient()
    client.down = True
    _watch(client, 1, timeout=0.4, seconds=1.0)
    assert exits == [distributed.LOST_HOST_EXIT_CODE]
    assert "error: lost host: process 0 of 2 (the coordinator) has not answered for " in capsys.readouterr().err


def test_an_error_waits_for_the_peers_verdict(exits):
    """`verdict` returns once every peer beat twice more (the error is this process's own), and
    stops the process when a peer sends no more heartbeats (the error came from losing it)."""
    client = FakeClient()
    dog = distributed.Watchdog(client, 0, 2, timeout=2.0, period=0.05)
    dog.start()
    try:
        _beat(1, client, 0)
        time.sleep(0.2)
        for count in range(1, 4):
            _beat(1, client, count)
            time.sleep(0.1)
        start = time.monotonic()
        beats = threading.Thread(target=_beats, args=(1, client, range(4, 20), 0.05), daemon=True)
        beats.start()
        dog.verdict(5)
        assert time.monotonic() - start < 1.5 and not exits
        beats.join()
        with pytest.raises(Stopped):  # no more heartbeats: the peer is lost
            dog.verdict(5)
    finally:
        dog.closed.set()
    assert set(exits) == {distributed.LOST_HOST_EXIT_CODE}  # this thread's verdict, or the watchdog's own check


@pytest.mark.parametrize("argv, multi", [
    (["--config=c.py", "--num_processes=2", "--process_id=1"], True),
    (["--config=c.py", "--num_processes", "1"], False),
    (["--config=c.py"], False),
    (["--distributed"], True),
])
def test_the_supervisor_runs_for_multi_process_launches_only(monkeypatch, argv, multi):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert supervisor._multi_process(argv) == multi


CHILD = r'''
import os, sys, time
sys.stderr.write("W1206 10:00:00.000000 1 preemption_sync_manager.cc:147] Failed to retrieve preemption notice\n")
sys.stderr.write("Additional GRPC error information from remote target coordination_service\n")
sys.stderr.flush()
if sys.argv[1] == "fatal":
    sys.stderr.write("F1206 10:00:00.000001 1 client.h:80] Terminating process because the JAX distributed service "
                     "detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. "
                     "Either the leader task was preempted\n*** Check failure stack trace: ***\n    @ 0x1 abc\n")
    sys.stderr.flush()
    os.abort()
time.sleep(2.5)
sys.stderr.write("error: its own line\n")
sys.exit(3)
'''


@pytest.mark.parametrize("mode", ["fatal", "own"])
def test_the_supervisor_turns_the_runtimes_abort_into_one_line(tmp_path, mode):
    """A child that jax's runtime aborts: one line naming the lost coordinator and the newest
    checkpoint, exit code 75, none of the abort's output; any other end: the child's own lines
    (the runtime's log lines after the hold) and exit code."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "w" / "checkpoints" / "8").mkdir(parents=True)
    launcher = ("import sys; from colax import supervisor; "
                f"supervisor.supervise([{str(script)!r}, sys.argv[1], '--num_processes=2', '--workdir', sys.argv[2]])")
    proc = subprocess.run([sys.executable, "-c", launcher, mode, str(tmp_path / "w")], capture_output=True, text=True,
                          timeout=60)
    if mode == "fatal":
        assert proc.returncode == 75
        assert proc.stderr.strip() == (
            "error: lost host: process 0 (the coordinator) is gone, and jax's distributed runtime stopped this "
            "process (UNAVAILABLE: Failed to send RPC to coordination service); the run stopped, the last good "
            f"checkpoint is {tmp_path / 'w' / 'checkpoints' / '8'}; relaunch every process with the same command "
            "to resume (any host count)")
    else:
        assert proc.returncode == 3
        assert proc.stderr.splitlines() == [
            "W1206 10:00:00.000000 1 preemption_sync_manager.cc:147] Failed to retrieve preemption notice",
            "Additional GRPC error information from remote target coordination_service", "error: its own line"]


def test_a_train_pipeline_starts_at_any_global_batch_for_any_host_count(tmp_path):
    """Global batch k read from start_batch=k by 1 or 2 processes is batch k of one uninterrupted pass."""
    docs = [f"document {i} " + "word " * (i % 7 * 20) for i in range(40)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    for packing in (False, True):
        cfg = _cfg(source="text", path=str(tmp_path / "c.txt"), val_docs=8, seq_len=16, packing=packing)
        take = lambda n, p=0, count=1, start=0: [next(it) for it in [data.make_pipeline(
            cfg, CharTokenizer(), split="train", global_batch_size=4, process_index=p, process_count=count,
            start_batch=start)] for _ in range(n)]
        whole = take(12)  # past an epoch: 32 documents of 4 rows a batch
        for start in (3, 9):
            hosts = [take(3, p, 2, start) for p in (0, 1)]
            for k in range(3):
                for key, value in whole[start + k].items():
                    np.testing.assert_array_equal(np.concatenate([hosts[0][k][key], hosts[1][k][key]]), value)
            one = take(2, 0, 1, start)
            np.testing.assert_array_equal(one[0]["inputs"], whole[start]["inputs"])


def test_a_streamed_source_does_not_start_at_a_global_batch():
    with pytest.raises(ConfigError, match="start_batch"):
        data.make_pipeline(_cfg(source="hf"), CharTokenizer(), split="train", global_batch_size=4, start_batch=2)


def test_a_streamed_source_resumes_on_its_own_process_count_only(tmp_path, monkeypatch):
    """A checkpoint of 2 processes with a per-process stream position: one line saying so, not "damaged"."""
    monkeypatch.setattr(checkpoint, "saved_topology", lambda mngr, step: {"process_count": 2, "device_count": 2})
    monkeypatch.setattr(checkpoint, "_trained_steps", lambda mngr, step=0: [4])

    class Manager:
        directory = tmp_path

    with pytest.raises(ConfigError, match=r"checkpoint 4 was written by 2 processes with 2 devices: a streamed "
                                          r"source's position .* resumes on 2 processes only, not 1"):
        checkpoint.restore(Manager(), None, data_iter=object())


def test_peers_are_judged_from_watch_on(exits):
    """Start-up (tokenizer training, packing) may hold every process's GIL for longer than the
    timeout: a silent peer stops no process before the loop calls `watch`."""
    client = FakeClient()
    dog = distributed.Watchdog(client, 0, 2, timeout=0.2, period=0.05)
    dog.start()
    try:
        time.sleep(0.6)
        assert not exits
        dog.watch()
        time.sleep(0.6)
    finally:
        dog.closed.set()
    assert exits and set(exits) == {distributed.LOST_HOST_EXIT_CODE}
