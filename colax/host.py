"""The host process on a CPU backend: glibc's malloc set to keep the memory XLA:CPU frees.

XLA:CPU allocates an executable's temporary buffers with `malloc` at every run and frees them after.
glibc serves an allocation over 32 MiB with a fresh `mmap` and unmaps it on `free`, so the kernel
zero-fills every page of the step's temporaries again at first touch, every step: 449k page faults
and ~0.8 s of system time in a 2 s CoLA-60M fp32 training step at 8 x 256 (docs/cpu_performance.md).
`reuse_freed_memory` sets glibc (`mallopt`) to serve every allocation from one heap that is never
trimmed, so the next step reuses the same pages: no faults, at the cost of a resident set that stays
at its peak (+1.7 GiB, 3.3 -> 5.1 GiB, for that step).

It must run before the JAX backend starts its threads (a thread that already has its own malloc arena
keeps it); train.py, `python -m colax.evaluate`, `python -m colax.generate`, benchmarks/cpu_step.py
(its colax processes) and the notebooks' setup cell call it first thing. It does nothing off
Linux/glibc, where an accelerator plugin (CUDA, ROCm; libtpu only where a TPU chip is attached: the
`tpu` extra installs it on CPU machines to compile for TPU topologies) is installed and JAX_PLATFORMS
does not select the CPU, or where the environment variable COLAX_MALLOC is "system". Where libtpu is
installed with no TPU chip (and JAX_PLATFORMS is unset) it sets JAX_PLATFORMS=cpu for the process
and its children: JAX would run on the CPU anyway, after starting libtpu in vain.
"""

import ctypes
import functools
import importlib.metadata
import os
import signal
import sys

ENV = "COLAX_MALLOC"  # "system": leave glibc's malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _tpu_attached():
    """Whether a TPU chip is on this machine's PCI bus (jax's own test, before it loads libtpu)."""
    from jax._src import hardware_utils  # imports jax, starts no backend

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


@functools.cache
def _plugins():
    """The accelerator plugins installed (names from _ACCELERATOR_PLUGINS); listed once per process
    (~50 ms: reuse_freed_memory asks twice)."""
    names = [(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()]
    return {p for p in _ACCELERATOR_PLUGINS for name in names if name.startswith(p)}


def _cpu_backend():
    """Whether JAX will run on the CPU: JAX_PLATFORMS starts with cpu, or no accelerator plugin is
    installed (libtpu counts only with a TPU chip attached)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = _plugins()
    return not plugins - {"libtpu"} and not ("libtpu" in plugins and _tpu_attached())


def _skip_idle_libtpu():
    """JAX_PLATFORMS=cpu where it is unset, libtpu is the only accelerator plugin and no TPU chip is
    attached (the `tpu` extra on a CPU machine): JAX would start libtpu in every process in vain (about
    2 s, and five lines of its warnings on stderr) before running on the CPU. Returns whether it did."""
    if os.environ.get("JAX_PLATFORMS") or _plugins() != {"libtpu"} or _tpu_attached():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"  # the processes this one starts
    # this one: jax (imported by _tpu_attached) read the variable at its import; no backend started yet
    sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def _glibc():
    """The C library as ctypes, or None where it is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def reuse_freed_memory():
    """Keep freed memory in the process (one malloc arena, no mmap, no trimming) on a CPU backend
    under glibc; returns whether it did. COLAX_MALLOC=system turns it off. First, on a machine whose
    only accelerator plugin is a libtpu with no TPU chip, it selects the CPU (`_skip_idle_libtpu`)."""
    _skip_idle_libtpu()
    if os.environ.get(ENV, "").lower() == "system" or not _cpu_backend():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # Threads share the main arena (others fall back to mmap for large blocks), blocks come from the
    # heap instead of mmap, and free never returns the heap's top to the kernel (-1: no threshold).
    return all(libc.mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def die_with_parent():
    """This process gets SIGKILL when its parent dies (Linux; elsewhere nothing): a child that must
    not outlive the process that reads its results (the supervised trainer, prepare's workers,
    which would otherwise each print a BrokenPipeError traceback when a killed prepare's pipe closes)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
