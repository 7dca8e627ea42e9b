"""The run's workdir: its config (config.json) and its orbax checkpoints (checkpoints/<step>/).

A checkpoint holds "state" (params and optimizer state, the step count inside) and "data" (the
grain train iterator's position). Saves are asynchronous and atomic (orbax writes to a temporary
folder and renames it when complete), so a run killed during a save resumes from the previous one.
"""

import json
import shutil

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from flax import nnx
from ml_collections import config_flags

from colax import config as config_lib
from colax import model, optim, sharding, state, tokenizer
from colax.errors import ConfigError, DataError

CONFIG_NAME = "config.json"
# Keys that may change between a run and its resumption (they do not change the trained model).
FREE_KEYS = ("mesh.", "train.micro_batch_size", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.baseline_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.on_nonfinite",
             "train.sample_", "data.worker_count", "data.read_threads", "data.prefetch")
# What --overwrite deletes: everything a run writes into its workdir.
RUN_FILES = (CONFIG_NAME, "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model")


def flatten(tree, prefix=""):
    """{"a.b": leaf} of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}


def config_diff(old, new):
    """The first key (sorted) outside FREE_KEYS where two config dicts differ, or None."""
    old, new = flatten(old), flatten(new)
    keys = sorted(k for k in old.keys() | new.keys() if not k.startswith(FREE_KEYS))
    return next((k for k in keys if old.get(k) != new.get(k)), None)


def prepare_workdir(workdir, cfg: ml_collections.ConfigDict, overwrite=False):
    """Creates `workdir` and writes config.json; refuses a workdir that holds a different run.

    A workdir whose config.json differs from `cfg` outside FREE_KEYS raises ConfigError, unless
    `overwrite`, which deletes the old run's files first.
    """
    workdir = epath.Path(workdir)
    path = workdir / CONFIG_NAME
    new = json.loads(cfg.to_json_best_effort())
    if path.exists():
        key = config_diff(json.loads(path.read_text()), new)
        if key and not overwrite:
            old = flatten(json.loads(path.read_text())).get(key)
            raise ConfigError(f"workdir {workdir} holds a run with another config ({key}: {old!r} -> "
                              f"{flatten(new).get(key)!r}); pass --overwrite to start over")
        if key and jax.process_index() == 0:
            for name in RUN_FILES:
                target = workdir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        path.write_text(json.dumps(new, indent=2) + "\n")


def step_dir(workdir, step):
    """The folder of checkpoint `step` in `workdir`, as the user wrote `workdir`."""
    return epath.Path(workdir) / "checkpoints" / str(step)


def manager(workdir, cfg_train):
    """An orbax CheckpointManager over workdir/checkpoints keeping `train.keep_checkpoints`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg_train.keep_checkpoints,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints", options=options)


def save(mngr, step, params, opt_state, data_iter):
    """Starts an async save of the state after `step` optimizer steps (returns once copied to host)."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(dict(params=params, opt_state=opt_state)),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def restore(mngr, step, target, data_iter):
    """(params, opt_state) of checkpoint `step`, restored into `target`.

    target: `(params, opt_state)` of ShapeDtypeStructs with shardings (`state.abstract_state`),
    so each device reads only its shards, on any mesh. The data iterator is moved in place to its
    saved position.
    """
    params, opt_state = target
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(dict(params=params, opt_state=opt_state)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored.state["params"], restored.state["opt_state"]


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
    """The ConfigDict of the run in `workdir` (its config.json) with `overrides` ({"a.b": value}) applied."""
    path = epath.Path(workdir) / CONFIG_NAME
    if not path.exists():
        raise DataError(f"{path} not found: --workdir must be the folder of a colax run")
    cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    cfg.update_from_flattened_dict(dict(overrides or {}))
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
    logging.set_verbosity(logging.ERROR)  # orbax warns about metadata files a params-only restore skips
    f = flags.FLAGS
    return load_run(f.workdir, config_flags.get_override_values(f["config"]), f.step)
