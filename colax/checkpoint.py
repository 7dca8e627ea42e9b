"""The run's workdir: its config (config.json) and its orbax checkpoints (checkpoints/<step>/).

A checkpoint holds "state" (params and optimizer state, the step count inside), "data" (the
grain train iterator's position) and "config" (the run's config, should config.json be lost).
Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it when
complete), so a run killed during a save resumes from the previous one; a failed save raises
CheckpointError at the next `check_saves`. Restoring falls back to the newest checkpoint that
restores cleanly, setting the damaged ones aside.
"""

import dataclasses
import json
import logging
import os
import shutil

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from ml_collections import config_flags

from colax import config as config_lib
from colax import errors, model, optim, sharding, state, tokenizer
from colax import workdir as workdir_lib
from colax.errors import CheckpointError, ConfigError, DataError

CONFIG_NAME = "config.json"
# Keys that may change between a run and its resumption (they do not change the trained model).
FREE_KEYS = ("mesh.", "train.micro_batch_size", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.baseline_batches", "train.checkpoint_every", "train.keep_checkpoints",
             "train.sample_", "data.worker_count", "data.read_threads", "data.prefetch")
# Recovery settings: they may change on resume too (to get past a divergence); a notice lists them.
RECOVERY_KEYS = ("optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip", "train.on_nonfinite",
                 "train.max_skipped_steps", "train.spike_factor", "train.spike_window", "train.resume_step")
# What --overwrite deletes: everything a run writes into its workdir.
RUN_FILES = (CONFIG_NAME, "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model")


def _note(line):
    """Prints a line about the workdir (process 0)."""
    if jax.process_index() == 0:
        print(line, flush=True)


def flatten(tree, prefix=""):
    """{"a.b": leaf} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}


def _changed(old, new, keep):
    """Sorted keys where two config dicts differ, among those for which keep(key)."""
    old, new = flatten(old), flatten(new)
    return [k for k in sorted(old.keys() | new.keys()) if keep(k) and old.get(k) != new.get(k)]


def config_diff(old, new):
    """The first key (sorted) outside FREE_KEYS and RECOVERY_KEYS where two config dicts differ, or None."""
    return next(iter(_changed(old, new, lambda k: not k.startswith(FREE_KEYS + RECOVERY_KEYS))), None)


def recovery_changes(old, new):
    """"key: old -> new" for each recovery setting (RECOVERY_KEYS) that differs."""
    flat_old, flat_new = flatten(old), flatten(new)
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
            for k in _changed(old, new, lambda k: k.startswith(RECOVERY_KEYS))]


def _saved_config(workdir):
    """(step, config dict) of the newest checkpoint that holds its run's config, or (None, None)."""
    path = epath.Path(workdir).absolute() / "checkpoints"
    if not path.exists():
        return None, None
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception:  # a checkpoint without (or with a damaged) config item: try the previous one
            continue
    return None, None


def run_config(workdir):
    """The config dict of the run in `workdir`, or None for a new workdir: config.json, or where that
    is missing or unreadable (a torn write) the config saved in the newest checkpoint."""
    path = epath.Path(workdir) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problem = "missing"
    except (OSError, ValueError) as e:
        problem = f"unreadable ({errors.cause(e)})"
    step, saved = _saved_config(workdir)
    if saved is not None:
        _note(f"{path} is {problem}: using the config saved in checkpoint {step}")
    return saved


def check_workdir(workdir, cfg: ml_collections.ConfigDict, overwrite=False):
    """Checks that `cfg` may run in `workdir`, writing nothing. Returns (old, replace): the config dict
    of the run that will be resumed (None: none), and whether `overwrite` replaces another run.

    A workdir whose run has a config that differs from `cfg` outside FREE_KEYS and RECOVERY_KEYS
    raises ConfigError, unless `overwrite`.
    """
    old = run_config(workdir)
    new = json.loads(cfg.to_json_best_effort())
    key = None if old is None else config_diff(old, new)
    if key and not overwrite:
        raise ConfigError(f"workdir {workdir} holds a run with another config ({key}: {flatten(old).get(key)!r} "
                          f"-> {flatten(new).get(key)!r}); pass --overwrite to start over")
    return (None, True) if key else (old, False)


def prepare_workdir(workdir, cfg: ml_collections.ConfigDict, overwrite=False):
    """Checks `cfg` against the run in `workdir` (`check_workdir`), deletes that run's files if
    `overwrite` replaces it, and writes config.json (atomically). Returns the old run's config dict
    (None: a new run). Call it once every other check has passed.
    """
    old, replace = check_workdir(workdir, cfg, overwrite)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        for name in RUN_FILES if replace else ():
            target = workdir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        workdir_lib.atomic_write(workdir / CONFIG_NAME, json.dumps(json.loads(cfg.to_json_best_effort()), indent=2) + "\n")
    return old


def step_dir(workdir, step):
    """The folder of checkpoint `step` in `workdir`, as the user wrote `workdir`."""
    return epath.Path(workdir) / "checkpoints" / str(step)


@dataclasses.dataclass
class _KeepLatestAndPinned:
    """Orbax preservation policy: the newest `n` checkpoints and the steps in `pinned` (a live set)."""
    n: int
    pinned: set

    def should_preserve(self, checkpoints, *, context):
        del context
        return [i >= len(checkpoints) - self.n or c.step in self.pinned for i, c in enumerate(checkpoints)]


def manager(workdir, cfg_train, pinned=frozenset()):
    """An orbax CheckpointManager over workdir/checkpoints keeping the newest `train.keep_checkpoints`
    and the steps in `pinned` (a set the caller may grow while the run goes on)."""
    absl_logging.get_absl_logger().addFilter(_REPORTED_HERE)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepLatestAndPinned(cfg_train.keep_checkpoints, pinned),
        enable_async_checkpointing=True)
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


def save(mngr, step, params, opt_state, data_iter, config=None):
    """Starts an async save of the state after `step` optimizer steps (returns once copied to host),
    after the previous save has finished (CheckpointError if that one failed).

    config: the run's config dict, saved beside the state (`run_config` falls back to it).
    """
    check_saves(mngr, wait=True)
    items = dict(state=ocp.args.StandardSave(dict(params=params, opt_state=opt_state)),
                 data=grain.checkpoint.CheckpointSave(data_iter))
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
        raise CheckpointError(f"checkpoint {mngr.last_save} could not be saved: {errors.cause(e)}; "
                              "the previous checkpoints are intact") from None


def _set_aside(mngr, step, why):
    """Renames checkpoints/<step> to checkpoints/<step>.<why> (orbax then ignores it)."""
    root = epath.Path(mngr.directory)
    target = root / f"{step}.{why}"
    n = 1
    while target.exists():
        n += 1
        target = root / f"{step}.{why}.{n}"
    if jax.process_index() == 0:
        (root / str(step)).rename(target)
    return target.name


def _trained_steps(mngr, resume_step=0):
    """The manager's checkpoints of trained steps, newest first (0 is a `colax.convert` import);
    ConfigError unless `resume_step` (if > 0) is one of them."""
    steps = sorted((s for s in mngr.all_steps() if s > 0), reverse=True)
    if resume_step and resume_step not in steps:
        raise ConfigError(f"train.resume_step={resume_step}: no such checkpoint in {mngr.directory} "
                          f"(kept: {', '.join(map(str, sorted(steps))) or 'none'})")
    return steps


def check_resume_step(workdir, resume_step):
    """ConfigError unless `resume_step` (if > 0) is a kept checkpoint of the run in `workdir` (reads only)."""
    if resume_step:
        path = epath.Path(workdir).absolute() / "checkpoints"
        _trained_steps(ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True)),
                       resume_step)


def restore(mngr, target, data_iter, step=0):
    """(step, params, opt_state) of the newest checkpoint that restores cleanly, or of `step` if > 0.

    target: step -> `(params, opt_state)` of ShapeDtypeStructs with shardings
    (`state.abstract_state`; the state's structure may depend on the step, as the optimizer state
    of a full-rank warm start does), so each device reads only its shards, on any mesh. The data iterator is moved in place to its
    saved position. A newer checkpoint that fails to restore is renamed `<step>.corrupt`; those
    newer than an explicit `step`, `<step>.abandoned` (the run continues from `step`); a line says so.
    """
    steps = _trained_steps(mngr, step)
    failed = []
    for s in [step] if step else steps:
        params, opt_state = target(s)
        try:
            restored = mngr.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(dict(params=params, opt_state=opt_state)),
                data=grain.checkpoint.CheckpointRestore(data_iter)))
        except Exception as e:  # pylint: disable=broad-except
            failed.append(f"{s} ({errors.cause(e)})")
            _note(f"checkpoint {s} cannot be restored: {errors.cause(e)}")
            continue
        for newer in (n for n in steps if n > s):
            why = "abandoned" if step else "corrupt"
            _note(f"checkpoint {newer} set aside as checkpoints/{_set_aside(mngr, newer, why)}")
        mngr.reload()
        return s, restored.state["params"], restored.state["opt_state"]
    raise CheckpointError(f"no checkpoint in {mngr.directory} restores: {'; '.join(failed)}")


def check_shapes(expected, found, where):
    """DataError naming the first key whose shape differs, is missing or is extra.

    expected, found: nested dicts of arrays (or anything with `.shape`), compared by `flatten` key.
    """
    want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
    have = {k: tuple(v.shape) for k, v in flatten(found).items()}
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
    params, _ = state.abstract_state(spec, optim.make(cfg.optim, cfg.train.steps), sharding.make_mesh(cfg.mesh))
    stored = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / "state").tree
    check_shapes(params, stored["params"], f"checkpoint {mngr.directory / str(step)}")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=dict(params=params), restore_args=ocp.checkpoint_utils.construct_restore_args(dict(params=params)),
        partial_restore=True)))
    return nnx.graphdef(model.abstract_model(spec)), restored.state["params"]


def load_config(workdir, overrides=None):
    """The ConfigDict of the run in `workdir` (`run_config`) with `overrides` ({"a.b": value}) applied.

    Keys added to colax after the run was written take their defaults; a key colax does not know
    is a ConfigError naming it.
    """
    saved = run_config(workdir)
    if saved is None:
        raise DataError(f"{epath.Path(workdir) / CONFIG_NAME} not found: --workdir must be the folder of a colax run")
    config_lib.check_keys(ml_collections.ConfigDict(saved))
    cfg = config_lib.defaults()
    cfg.update_from_flattened_dict({**flatten(saved), **(overrides or {})})
    return cfg


def load_run(workdir, overrides=None, step=None):
    """(cfg, tokenizer, graphdef, params, step) of the run in `workdir` at checkpoint `step` (default:
    the newest).

    The tokenizer is `data.tokenizer` if set, else workdir/tokenizer.model. DataError if the workdir
    has no config.json, no tokenizer or no checkpoint.
    """
    cfg = load_config(workdir, overrides)
    step = manager(workdir, cfg.train).latest_step() if step is None else step
    graphdef, params = load_params(cfg, workdir, step)
    tok = tokenizer.load_tokenizer(cfg.data.tokenizer or str(epath.Path(workdir) / tokenizer.MODEL_NAME))
    return cfg, tok, graphdef, params, step


def define_run_flags():
    """Defines --workdir, --step and --config.a.b=value (overrides of the run's config.json): the
    flags of the commands that read a finished run (colax.evaluate, colax.generate)."""
    flags.DEFINE_string("workdir", None, "Run folder (config.json, tokenizer.model, checkpoints/).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    config_flags.DEFINE_config_dict("config", config_lib.defaults(), "Overrides of the run's config.json.")


def load_run_from_flags(argv):
    """`load_run` of the flags of `define_run_flags` (absl usage error on positional arguments)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about metadata files a params-only restore skips
    f = flags.FLAGS
    return load_run(f.workdir, config_flags.get_override_values(f["config"]), f.step)
