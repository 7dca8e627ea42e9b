"""Multi-host training with real processes: `train.py --coordinator_address localhost:PORT
--num_processes N --process_id i`, over gloo CPU collectives, each process with its own simulated
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count).

A run spread over two processes equals one process with the same global device count step by
step; it moves between host (and device) counts and goes on exactly; a lost or hung host stops
the survivor within its heartbeat timeout with one line. The micro model and data are
test_train's; docs/sharding.md ("Multi-host") has the commands these tests run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from colax import data, tokenizer
from test_train import MICRO_CONFIG, micro_config, read_metrics

pytestmark = pytest.mark.slow  # several training processes at once: CI runs these on Python 3.11 only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds a launch may take before its processes are killed and the test fails


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, tokenizer path, compilation cache) shared by the module's runs."""
    root = tmp_path_factory.mktemp("multihost")
    config_file = root / "micro.py"
    config_file.write_text(MICRO_CONFIG)
    tok = tokenizer.train_tokenizer(data.train_documents(micro_config().data, 20), str(root / "tok"), 512, "bpe", 20)
    return str(config_file), tok.path, str(root / "jax_cache")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launch:
    """N processes of train.py on one workdir, each with `devices` simulated CPU devices; their
    stdout and stderr go to files, which `logs` gathers for a failure message."""

    count = 0  # launches so far: the log files' names

    def __init__(self, setup, workdir, processes, devices, *flags):
        config_file, tok, cache = setup
        Launch.count += 1
        # optimization level 0: the micro model's steps compile in half the time (test_notebooks does the same)
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0",
                   JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.pop("JAX_PLATFORMS", None)
        port, self.workdir, self.procs, self.files = _free_port(), workdir, [], []
        for i in range(processes):
            hosts = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                     f"--process_id={i}"] if processes > 1 else []
            out, err = (open(f"{workdir}.{Launch.count}.{i}.{s}", "w+") for s in ("out", "err"))
            self.files.append((out, err))
            self.procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_file}", f"--workdir={workdir}",
                 f"--config.data.tokenizer={tok}", *hosts, *flags], stdout=out, stderr=err, cwd=ROOT, env=env))

    def wait(self, timeout=TIMEOUT):
        """[(rc, stdout, stderr)] of every process once all have ended; kills them all after `timeout` s."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                pytest.fail(f"processes still running after {timeout} s\n{self.logs()}")
        return [(p.returncode, *self.output(i)) for i, p in enumerate(self.procs)]

    def output(self, i):
        out, err = self.files[i]
        for f in (out, err):
            f.flush()
            f.seek(0)
        return out.read(), err.read()

    def logs(self):
        return "\n".join(f"--- process {i} ({name}):\n{text}" for i in range(len(self.procs))
                         for name, text in zip(("stdout", "stderr"), self.output(i)))

    def check(self):
        """The outputs of a launch that must succeed: fails with every process's logs otherwise."""
        results = self.wait()
        assert all(rc == 0 for rc, _, _ in results), self.logs()
        return results


def _lines(text):
    """The lines of a process's output but gloo's own connection banners (its threads print them at
    once: a banner may be cut in two lines)."""
    return [line for line in text.splitlines() if line.strip() and not re.search(r"\[Gloo\]|peer ranks", line)]


def _report(stdout):
    """(validation loss, unigram baseline) of a run's final report line."""
    m = re.search(r"validation \(.*\): loss ([\d.]+), perplexity [\d.]+ \(unigram baseline ([\d.]+)\)", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_two_hosts_equal_one_and_the_run_moves_between_host_counts(setup, tmp_path):
    """2 processes x 2 devices (data across the processes, fsdp inside each) -> 1 process x 2 devices
    -> 2 x 2, against 1 process x 4 devices uninterrupted on the same mesh: the same loss at every
    step, the same final evaluation and unigram baseline (global, not process 0's share)."""
    mesh = ["--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.train.micro_batch_size=2",
            "--config.train.sample_tokens=0"]
    moved = str(tmp_path / "moved")
    reference = Launch(setup, str(tmp_path / "one"), 1, 4, *mesh)  # beside the first launch: their start-ups overlap
    first = Launch(setup, moved, 2, 2, *mesh, "--stop_after=2").check()
    (_, ref_out, _), = reference.check()
    assert "stopped after step 2" in first[0][1]
    assert not _lines(first[1][1]) and not _lines(first[1][2]), "process 1 printed the run's lines"
    topology = json.load(open(os.path.join(moved, "checkpoints", "2", "topology", "metadata")))
    assert topology == {"process_count": 2, "device_count": 4}

    (_, out, _), = Launch(setup, moved, 1, 2, *mesh, "--stop_after=4").check()
    assert ("checkpoint 2 was written by 2 processes with 4 devices; resuming on 1 process with 2 devices: the "
            "state is resharded onto the new mesh and the data continues at global batch 2") in out
    last = Launch(setup, moved, 2, 2, *mesh).check()
    assert "checkpoint 4 was written by 1 process with 2 devices; resuming on 2 processes with 4 devices" in last[0][1]

    records, expected = read_metrics(moved), read_metrics(str(tmp_path / "one"))
    assert [r["step"] for r in records] == list(range(1, 9)), "metrics.jsonl: each step once (process 0 writes)"
    # float32 sums in another order (per-process shards, another micro-batch split): 1e-5 relative
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in expected], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in records], [r["grad_norm"] for r in expected], rtol=1e-4)
    loss, baseline = _report(last[0][1])
    ref_loss, ref_baseline = _report(ref_out)
    assert loss == pytest.approx(ref_loss, rel=1e-4) and baseline == ref_baseline
    assert "validation" not in last[1][1]  # the final report comes from process 0 only
    assert sorted(os.listdir(os.path.join(moved, "checkpoints"))) == ["4", "6", "8"]
    assert sorted(os.listdir(moved)) == ["checkpoints", "config.json", "metrics.jsonl", "tensorboard"]
    assert len(os.listdir(os.path.join(moved, "tensorboard"))) == 3  # an event file per launch: process 0's


def _wait_for(path, launch, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or any(p.poll() is not None for p in launch.procs):
            for p in launch.procs:
                p.kill()
            pytest.fail(f"{path} did not appear\n{launch.logs()}")
        time.sleep(0.2)


def _trainer(pid):
    """The pid of the training process under train.py's supervisor `pid` (colax.supervisor)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    pytest.fail(f"process {pid} has no child")


@pytest.mark.parametrize("lost, how", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)])
def test_a_lost_host_stops_the_survivor_with_one_line(setup, tmp_path, lost, how):
    """kill -9 of one process (its supervisor: the trainer dies with it), or SIGSTOP of its trainer:
    the other stops within the heartbeat timeout (5 s here) with one line naming the lost process
    (process 0 hosts the coordination service: jax's runtime stops the survivor at once, and the
    survivor's supervisor says so) and the last good checkpoint, exit code 75, no abort and no stray
    file; relaunching both resumes from that checkpoint."""
    workdir = str(tmp_path / "run")
    flags = ["--heartbeat_timeout=5", "--config.train.steps=400", "--config.train.eval_every=0"]
    launch = Launch(setup, workdir, 2, 1, *flags)
    _wait_for(os.path.join(workdir, "checkpoints", "4"), launch)
    os.kill(launch.procs[lost].pid if how == signal.SIGKILL else _trainer(launch.procs[lost].pid), how)
    start = time.monotonic()
    survivor = 1 - lost
    try:
        rc = launch.procs[survivor].wait(60)
    except subprocess.TimeoutExpired:
        launch.procs[survivor].kill()
        pytest.fail(f"the survivor did not stop within 60 s\n{launch.logs()}")
    finally:
        if how == signal.SIGSTOP:
            os.kill(_trainer(launch.procs[lost].pid), signal.SIGKILL)
        launch.procs[lost].kill()
    took = time.monotonic() - start
    _, err = launch.output(survivor)
    lines = _lines(err)
    assert rc == 75 and len(lines) == 1, launch.logs()
    lost_line = (rf"process {lost} of 2 sent no heartbeat for \d+ s \(--heartbeat_timeout=5\)" if lost else
                 r"process 0 \(the coordinator\) is gone, and jax's distributed runtime stopped this process "
                 r"\(UNAVAILABLE: .*\)")
    m = re.fullmatch(rf"error: lost host: {lost_line}; the run stopped, the last good checkpoint is "
                     r"(.*/checkpoints/(\d+)); relaunch every process with the same command to resume \(any host "
                     r"count\)", lines[0])
    assert m and took < 30, (took, lines)
    assert os.path.exists(os.path.join(m.group(1), "commit_success.txt"))
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith(".write-check")]
    if how == signal.SIGKILL and lost == 1:
        step = int(m.group(2))
        results = Launch(setup, workdir, 2, 1, *flags, f"--stop_after={step + 1}").check()
        assert f"resuming at step {step}/400" in results[0][1]
        assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]  # cleaned
