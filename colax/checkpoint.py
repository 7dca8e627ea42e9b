"""The run's orbax checkpoints (workdir/checkpoints/<step>/); the run's config.json is `colax.run`'s.

A checkpoint holds "state" (params and optimizer state, the step count inside), "config" (the
run's config, should config.json be lost), "topology" (the process and device counts that wrote
it) and, for a streamed source only, "data" (each process's grain iterator position). A source
with a row store needs no data item: checkpoint s resumes at global batch s, the same rows on any
number of hosts (`colax.data.make_pipeline`'s start_batch), and the state restores resharded onto
any mesh, so a run moves to another host or device count. A streamed source's position is per
process: it resumes on the same number of processes only (a ConfigError says so).
Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it when
complete), so a run killed during a save resumes from the previous one; a failed save raises
CheckpointError at the next `check_saves`. Restoring falls back to the newest checkpoint that
restores cleanly, setting the damaged ones aside.
"""

import dataclasses
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import nnx, traverse_util

from colax import config as config_lib
from colax import errors, model, optim, sharding, state
from colax import workdir as workdir_lib
from colax.errors import CheckpointError, ConfigError, DataError


def saved_config(workdir):
    """(step, config dict) of the newest checkpoint that holds its run's config, or (None, None):
    `colax.run.run_config` falls back to it when config.json is missing or torn."""
    if not directory(workdir).exists():
        return None, None
    mngr = _reader(workdir)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception:  # a checkpoint without (or with a damaged) config item: try the previous one
            continue
    return None, None


def directory(workdir):
    """The checkpoints folder of `workdir`, as the user wrote `workdir`."""
    return epath.Path(workdir) / "checkpoints"


def step_dir(workdir, step):
    """The folder of checkpoint `step` in `workdir`, as the user wrote `workdir`."""
    return directory(workdir) / str(step)


@dataclasses.dataclass
class _KeepLatestAndPinned:
    """Orbax preservation policy: the newest `n` checkpoints and the steps in `pinned` (a live set)."""
    n: int
    pinned: set

    def should_preserve(self, checkpoints, *, context):
        del context
        return [i >= len(checkpoints) - self.n or c.step in self.pinned for i, c in enumerate(checkpoints)]


def manager(workdir, cfg_train, pinned=frozenset(), owner=False):
    """An orbax CheckpointManager over workdir/checkpoints keeping the newest `train.keep_checkpoints`
    and the steps in `pinned` (a set the caller may grow while the run goes on).

    owner: the caller is the run holding the workdir's lock; what an interrupted save left (orbax's
    temporary folders, `check_writable`'s probes) is removed. Any other reader leaves them alone: they
    may belong to a live run."""
    absl_logging.get_absl_logger().addFilter(_REPORTED_HERE)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepLatestAndPinned(cfg_train.keep_checkpoints, pinned),
        enable_async_checkpointing=True, cleanup_tmp_directories=owner)
    if owner and jax.process_index() == 0 and directory(workdir).exists():
        for probe in directory(workdir).glob(f"{_PROBE}*"):
            probe.rmdir()
    return _Manager(epath.Path(workdir).absolute() / "checkpoints", options=options)


class _Manager(ocp.CheckpointManager):
    """An orbax CheckpointManager that remembers the step of its last save started by `save` (orbax
    forgets a failed one, which `check_saves` then names)."""
    last_save = None


class _ReportedHere(logging.Filter):
    """Drops orbax's error records that carry a traceback: the failures they log are raised by
    `save`, `check_saves` and `restore` as one line naming the checkpoint and the cause."""

    def filter(self, record):
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


_REPORTED_HERE = _ReportedHere()
_PROBE = ".write-check-"


def check_writable(directory):
    """CheckpointError naming `directory` and the OS error unless a folder can be created in it (as
    orbax creates each step's; where it cannot, orbax's save waits minutes for the folder before it
    fails). A `directory` that does not exist yet is created by the manager: nothing to check."""
    directory = epath.Path(directory)
    if not directory.exists():
        return
    probe = directory / f"{_PROBE}{jax.process_index()}-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror}" if e.strerror else errors.cause(e)  # no probe name
        raise CheckpointError(f"checkpoints cannot be written in {directory} ({why})") from None


def topology():
    """{"process_count", "device_count"} of this run."""
    return dict(process_count=jax.process_count(), device_count=jax.device_count())


def save(mngr, step, params, opt_state, data_iter=None, config=None):
    """Starts an async save of the state after `step` optimizer steps (returns once copied to host),
    after the previous save has finished (CheckpointError if that one failed).

    data_iter: a streamed source's train iterator (its per-process position is saved), or None (a
    source with a row store resumes at global batch `step`).
    config: the run's config dict, saved beside the state (`saved_config` reads it back).
    """
    check_saves(mngr, wait=True)
    check_writable(mngr.directory)
    items = dict(state=ocp.args.StandardSave(dict(params=params, opt_state=opt_state)),
                 topology=ocp.args.JsonSave(topology()))
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    try:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"checkpoint {step} could not be saved: {errors.cause(e)}") from None
    mngr.last_save = step


def check_saves(mngr, wait=False):
    """Raises CheckpointError (naming the checkpoint and the cause) if an async save failed; with
    `wait`, waits for the save in flight first. As `save` checks before it starts the next save,
    a failed save is always the manager's `last_save`."""
    try:
        mngr.wait_until_finished() if wait else mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
        earlier = [s for s in mngr.all_steps() if s < mngr.last_save]
        kept = f"checkpoint {max(earlier)} is the newest intact one" if earlier else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint {mngr.last_save} could not be saved: {errors.cause(e)}; {kept}") from None


def set_aside(mngr, step, why):
    """Renames checkpoints/<step> to checkpoints/<step>.<why> (orbax then ignores it), with a note; a
    step the manager does not hold (its save failed) is left alone."""
    if step not in mngr.all_steps():
        return
    root = epath.Path(mngr.directory)
    target = root / f"{step}.{why}"
    n = 1
    while target.exists():
        n += 1
        target = root / f"{step}.{why}.{n}"
    if jax.process_index() == 0:
        (root / str(step)).rename(target)
    workdir_lib.note(f"checkpoint {step} set aside as checkpoints/{target.name}")


def _trained_steps(mngr, resume_step=0):
    """The manager's checkpoints of trained steps, newest first (0 is a `colax.convert` import);
    ConfigError unless `resume_step` (if > 0) is one of them."""
    steps = sorted((s for s in mngr.all_steps() if s > 0), reverse=True)
    if resume_step and resume_step not in steps:
        raise ConfigError(f"train.resume_step={resume_step}: no such checkpoint in {mngr.directory} "
                          f"(kept: {', '.join(map(str, sorted(steps))) or 'none'})")
    return steps


def _reader(workdir):
    """A read-only CheckpointManager over workdir/checkpoints."""
    return ocp.CheckpointManager(directory(workdir).absolute(), options=ocp.CheckpointManagerOptions(read_only=True))


def has_checkpoints(workdir):
    """Whether workdir/checkpoints holds any checkpoint (a `colax.convert` import's step 0 too); reads only."""
    return directory(workdir).exists() and bool(_reader(workdir).all_steps())


def check_resume_step(workdir, resume_step):
    """ConfigError unless `resume_step` (if > 0) is a kept checkpoint of the run in `workdir` (reads only)."""
    if resume_step:
        _trained_steps(_reader(workdir), resume_step)


def saved_topology(mngr, step):
    """{"process_count", "device_count"} that wrote checkpoint `step` (device_count None where a
    checkpoint from before the "topology" item says only its process count, by its data files)."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(topology=ocp.args.JsonRestore())).topology
    except Exception:  # pylint: disable=broad-except  # written before the topology item existed
        files = [p.name for p in (epath.Path(mngr.directory) / str(step) / "data").glob("process_*-of-*.json")]
        counts = {int(name.rsplit("-of-", 1)[1].split(".")[0]) for name in files}
        return dict(process_count=counts.pop() if len(counts) == 1 else None, device_count=None)


def describe(topo):
    """"2 processes with 4 devices" for a `topology()` dict (parts it does not know are left out)."""
    n, d = topo.get("process_count"), topo.get("device_count")
    parts = [f"{n} process{'es' if n != 1 else ''}" if n else "", f"{d} device{'s' if d != 1 else ''}" if d else ""]
    return " with ".join(p for p in parts if p) or "an unknown topology"


def restore(mngr, target, data_iter=None, step=0):
    """(step, params, opt_state, topology) of the newest checkpoint that restores cleanly, or of
    `step` if > 0; topology: `saved_topology`'s, that of the processes that wrote it.

    target: step -> `(params, opt_state)` of ShapeDtypeStructs with shardings
    (`state.abstract_state`; the state's structure may depend on the step, as the optimizer state
    of a full-rank warm start does), so each device reads only its shards, on any mesh.
    data_iter: a streamed source's train iterator, moved in place to its saved position (ConfigError
    if the checkpoint was written by another number of processes: that position is per process); None
    for a source with a row store. A newer checkpoint that fails to restore is renamed
    `<step>.corrupt`; those newer than an explicit `step`, `<step>.abandoned` (the run continues from
    `step`); a line says so.
    """
    steps = _trained_steps(mngr, step)
    failed = []
    for s in [step] if step else steps:
        topo = saved_topology(mngr, s)
        if data_iter is not None and topo["process_count"] not in (None, jax.process_count()):
            raise ConfigError(f"checkpoint {s} was written by {describe(topo)}: a streamed source's position "
                              f"(data.source) is kept per process, so it resumes on {topo['process_count']} "
                              f"processes only, not {jax.process_count()}; relaunch with that many, or prepare "
                              "the data (python -m colax.data prepare) to resume on any number")
        params, opt_state = target(s)
        items = dict(state=ocp.args.StandardRestore(dict(params=params, opt_state=opt_state)))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = mngr.restore(s, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except
            failed.append(f"{s} ({errors.cause(e)})")
            workdir_lib.note(f"checkpoint {s} cannot be restored: {errors.cause(e)}")
            continue
        for newer in (n for n in steps if n > s):
            why = "abandoned" if step else "corrupt"
            set_aside(mngr, newer, why)
        mngr.reload()
        return s, restored.state["params"], restored.state["opt_state"], topo
    raise CheckpointError(f"no checkpoint in {mngr.directory} restores: {'; '.join(failed)}")


def check_shapes(expected, found, where):
    """DataError naming the first key whose shape differs, is missing or is extra.

    expected, found: nested dicts of arrays (or anything with `.shape`), compared by "a.b" key.
    """
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep=".").items()}
    have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(found, sep=".").items()}
    for key in sorted(want.keys() | have.keys()):
        if key not in have:
            raise DataError(f"{where}: missing {key} (expected shape {list(want[key])})")
        if key not in want:
            raise DataError(f"{where}: unexpected {key} (shape {list(have[key])})")
        if want[key] != have[key]:
            raise DataError(f"{where}: {key} has shape {list(have[key])}, expected {list(want[key])}")


def save_params(workdir, step, params):
    """Writes a checkpoint of `params` alone (no optimizer state, no data position) as `step`."""
    mngr = ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints")
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(params=params))), force=True)
    mngr.wait_until_finished()


def load_params(cfg, workdir, step=None):
    """(graphdef, params) of checkpoint `step` (default: the newest) of the run of `cfg` in `workdir`.

    Only the parameters are read (checkpoints from `save_params` have nothing else), straight onto
    `cfg`'s mesh: for evaluation, sampling, analysis, export and `train.init_from`. A checkpoint
    whose parameters do not have `cfg`'s shapes is a DataError naming the parameter.
    """
    spec = config_lib.validate(cfg)
    mngr = manager(workdir, cfg.train)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        saved = f" (saved steps: {', '.join(map(str, mngr.all_steps()))})" if mngr.all_steps() else ""
        raise DataError(f"no checkpoint{'' if step is None else f' of step {step}'} in "
                        f"{epath.Path(workdir) / 'checkpoints'}{saved}")
    tx = optim.make(cfg.optim, cfg.train.steps, projection=spec.projection)
    params, _ = state.abstract_state(spec, tx, sharding.make_mesh(cfg.mesh))
    stored = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "state").tree
    check_shapes(params, stored["params"], f"checkpoint {mngr.directory / str(step)}")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=dict(params=params), restore_args=ocp.checkpoint_utils.construct_restore_args(dict(params=params)),
        partial_restore=True)))
    return nnx.graphdef(model.abstract_model(spec)), restored.state["params"]


