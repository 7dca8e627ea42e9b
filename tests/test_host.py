"""colax.host: with glibc's malloc set, a repeated XLA:CPU run reuses the pages its temporaries had.

Each case runs in a fresh process (the setting must come before JAX starts its threads) and counts
the minor page faults of each of twelve runs of a jitted function whose [8192, 8192] fp32 temporaries
XLA:CPU allocates anew at every run. Counts, not timings.

With the setting, some runs after the first still grow the heap (XLA's threads free and allocate in
an order that can leave no free block large enough: 131k faults, one 512 MiB growth, seen up to four
times in twelve runs under a concurrent job), so the test asserts on the median run, not on every run.
"""

import statistics
import os
import subprocess
import sys
import types

import jax
import pytest

from colax import host

SCRIPT = """
import resource, sys
from colax import host
kept = host.reuse_freed_memory() if sys.argv[1] == "on" else False
import jax, jax.numpy as jnp

def g(x):  # a loop, so that XLA:CPU runs it on its own threads rather than inline on this one
    y = x @ x.T  # [8192, 8192] fp32: 256 MiB
    return jax.lax.fori_loop(0, 2, lambda i, s: s + (y + y.T).sum(0), jnp.zeros(x.shape[0]))

f, x = jax.jit(g), jnp.ones((8192, 64))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""

glibc = pytest.mark.skipif(host._glibc() is None, reason="glibc's malloc only (Linux)")


def repeated_run_faults(setting, **env):
    """(whether colax.host changed malloc, the median of the minor page faults of runs 2-12) in a fresh
    process; the first run grows the heap in either setting."""
    import os

    out = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    kept, *faults = out.stdout.split()
    return kept == "True", statistics.median(int(n) for n in faults[1:])


@glibc
def test_repeated_runs_touch_no_fresh_pages():
    """Without the setting each run faults its temporaries in again (~148k 4 KiB pages); with it, most
    runs fault in none."""
    kept, faults = repeated_run_faults("off")
    assert not kept and faults > 100_000
    kept, faults = repeated_run_faults("on")
    assert kept and faults < 500


@glibc
def test_colax_malloc_system_leaves_malloc():
    kept, faults = repeated_run_faults("on", COLAX_MALLOC="system")
    assert not kept and faults > 100_000


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_only_for_a_cpu_backend(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host._cpu_backend() is expected


@pytest.mark.parametrize("plugin, tpu_chips, expected", [("libtpu", 0, True), ("libtpu", 4, False),
                                                         ("jax-cuda12-plugin", 0, False), ("numpy", 0, True)])
def test_libtpu_counts_only_with_a_tpu_attached(monkeypatch, plugin, tpu_chips, expected):
    """The tpu extra (libtpu, for `colax.plan --topology`) on a machine with no TPU leaves the CPU backend."""
    from jax._src import hardware_utils

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host.importlib.metadata, "distributions",
                        lambda: [types.SimpleNamespace(metadata={"Name": plugin})])
    host._plugins.cache_clear()  # listed once per process: list the patched ones
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (tpu_chips, None))
    assert host._cpu_backend() is expected


@pytest.mark.parametrize("plugins, tpu_chips, platforms, expected", [
    (["libtpu"], 0, None, "cpu"), (["libtpu"], 4, None, None), (["libtpu", "jax-cuda12-plugin"], 0, None, None),
    (["numpy"], 0, None, None), (["libtpu"], 0, "tpu", "tpu")])
def test_an_idle_libtpu_is_not_started(monkeypatch, plugins, tpu_chips, platforms, expected):
    """The tpu extra on a machine with no TPU: JAX_PLATFORMS=cpu (JAX would start libtpu in vain and print
    its warnings); a TPU chip, another plugin or the user's JAX_PLATFORMS leaves the platforms alone."""
    from jax._src import hardware_utils

    monkeypatch.setenv("JAX_PLATFORMS", platforms or "")  # restored after the test, also where it was unset
    if platforms is None:
        monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(host.importlib.metadata, "distributions",
                        lambda: [types.SimpleNamespace(metadata={"Name": p}) for p in plugins])
    host._plugins.cache_clear()  # listed once per process: list the patched ones
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (tpu_chips, None))
    before = jax.config.jax_platforms
    try:
        assert host._skip_idle_libtpu() is (expected == "cpu" and platforms is None)
        assert os.environ.get("JAX_PLATFORMS") == expected
        assert jax.config.jax_platforms == ("cpu" if expected == "cpu" and platforms is None else before)
    finally:
        jax.config.update("jax_platforms", before)


def test_a_process_with_an_idle_libtpu_starts_on_the_cpu_quietly():
    """A real process on this machine, JAX_PLATFORMS unset: after `reuse_freed_memory` (as train.py calls
    it, before jax is imported) jax runs on the CPU without starting libtpu (no word of it on stderr)."""
    if host._plugins() != {"libtpu"} or host._tpu_attached():
        pytest.skip("needs libtpu (the tpu extra) as the only accelerator plugin and no TPU chip")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "from colax import host; host.reuse_freed_memory(); import jax; print(jax.devices()[0].platform)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "cpu", r.stderr
    assert "tpu" not in r.stderr.lower(), r.stderr


@pytest.fixture(autouse=True)
def _fresh_plugin_list():
    """Each test lists the installed plugins anew, and leaves no patched list behind."""
    yield
    host._plugins.cache_clear()
