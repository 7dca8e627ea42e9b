"""The run in a workdir: its config.json (checked before a run starts or resumes, written once every
check passed) and, for the tools that read a finished run (`colax.evaluate`, `colax.generate`,
`colax.convert`), its config, tokenizer and parameters. The checkpoints themselves are
`colax.checkpoint`'s.
"""

import json
import shutil

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from flax import traverse_util
from ml_collections import config_flags

from colax import checkpoint, errors, tokenizer
from colax import config as config_lib
from colax import workdir as workdir_lib
from colax.errors import ConfigError, DataError

CONFIG_NAME = "config.json"
# Keys that may change between a run and its resumption (they do not change the trained model).
FREE_KEYS = ("mesh.", "train.micro_batch_size", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.final_eval_tokens", "train.baseline_batches", "train.checkpoint_every", "train.keep_checkpoints",
             "train.sample_", "data.worker_count", "data.read_threads", "data.prefetch")
# Recovery settings: they may change on resume too (to get past a divergence); a notice lists them.
RECOVERY_KEYS = ("optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.grad_clip", "train.on_nonfinite",
                 "train.max_skipped_steps", "train.spike_nats", "train.spike_window", "train.resume_step")
# The checkpoint steps the divergence guard pinned (`colax.guard`), kept across restarts.
PINNED_NAME = "pinned.json"
# What --overwrite deletes: everything a run writes into its workdir.
RUN_FILES = (CONFIG_NAME, "checkpoints", "metrics.jsonl", "tensorboard", "tokenizer.model", PINNED_NAME)


def _changed(old, new, keep):
    """Sorted keys where two config dicts differ, among those for which keep(key)."""
    old, new = traverse_util.flatten_dict(old, sep="."), traverse_util.flatten_dict(new, sep=".")
    return [k for k in sorted(old.keys() | new.keys()) if keep(k) and old.get(k) != new.get(k)]


def config_diff(old, new):
    """The first key (sorted) outside FREE_KEYS and RECOVERY_KEYS where two config dicts differ, or None."""
    return next(iter(_changed(old, new, lambda k: not k.startswith(FREE_KEYS + RECOVERY_KEYS))), None)


def recovery_changes(old, new):
    """"key: old -> new" for each recovery setting (RECOVERY_KEYS) that differs."""
    flat_old, flat_new = traverse_util.flatten_dict(old, sep="."), traverse_util.flatten_dict(new, sep=".")
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
            for k in _changed(old, new, lambda k: k.startswith(RECOVERY_KEYS))]


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
    step, saved = checkpoint.saved_config(workdir)
    if saved is not None:
        workdir_lib.note(f"{path} is {problem}: using the config saved in checkpoint {step}")
    return saved


def with_new_keys(saved):
    """A run's config dict `saved` with each key colax added after the run was written at its
    default (as `load_config` reads a run): a run resumes under a newer colax."""
    flat = traverse_util.flatten_dict(json.loads(config_lib.defaults().to_json_best_effort()), sep=".")
    return traverse_util.unflatten_dict({**flat, **traverse_util.flatten_dict(saved, sep=".")}, sep=".")


def check_workdir(workdir, cfg: ml_collections.ConfigDict, overwrite=False):
    """Checks that `cfg` may run in `workdir`, writing nothing. Returns (old, replace): the config dict
    of the run that will be resumed (None: none), and whether `overwrite` replaces another run.

    A workdir whose run has a config that differs from `cfg` outside FREE_KEYS and RECOVERY_KEYS
    (keys added to colax since the run was written count at their defaults, `with_new_keys`) raises ConfigError, unless `overwrite` or the workdir holds no checkpoint (a start that was
    interrupted before its first save left nothing to resume: its files are replaced, with a note).
    """
    old = run_config(workdir)
    old = None if old is None else with_new_keys(old)
    new = json.loads(cfg.to_json_best_effort())
    key = None if old is None else config_diff(old, new)
    if key and not overwrite and not checkpoint.has_checkpoints(workdir):
        workdir_lib.note(f"workdir {workdir} holds no checkpoint: its run of another config ({key}) is replaced")
        overwrite = True
    if key and not overwrite:
        was, now = (traverse_util.flatten_dict(c, sep=".").get(key) for c in (old, new))
        raise ConfigError(f"workdir {workdir} holds a run with another config ({key}: {was!r} -> {now!r}); "
                          "pass --overwrite to start over")
    return (None, True) if key else (old, False)


def prepare_workdir(workdir, cfg: ml_collections.ConfigDict, overwrite=False):
    """Checks `cfg` against the run in `workdir` (`check_workdir`), then `write_workdir`. Returns the
    old run's config dict (None: a new run). Call it once every other check has passed.
    """
    old, replace = check_workdir(workdir, cfg, overwrite)
    write_workdir(workdir, cfg, replace)
    return old


def write_workdir(workdir, cfg: ml_collections.ConfigDict, replace):
    """Deletes the replaced run's files (`replace`, from `check_workdir`) and writes config.json
    (atomically); process 0 writes."""
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


def forget_resume_step(workdir):
    """Records in config.json that no `train.resume_step` has been applied (process 0 writes): after
    a divergence, the rerun the stop message advises goes back to the checkpoint it names even
    when an earlier go-back used the same step."""
    path = epath.Path(workdir) / CONFIG_NAME
    saved = run_config(workdir)
    if jax.process_index() == 0 and saved is not None and saved["train"].get("resume_step"):
        saved["train"]["resume_step"] = 0
        workdir_lib.atomic_write(path, json.dumps(saved, indent=2) + "\n")


def read_pinned(workdir):
    """The checkpoint steps pinned by the run in `workdir` (a set; empty if none, or unreadable: a torn write)."""
    try:
        return set(json.loads((epath.Path(workdir) / PINNED_NAME).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def write_pinned(workdir, steps):
    """Stores the pinned checkpoint `steps` (none: removes the file); process 0 writes."""
    path = epath.Path(workdir) / PINNED_NAME
    if jax.process_index() != 0:
        return
    if steps:
        workdir_lib.atomic_write(path, json.dumps({"steps": sorted(steps)}) + "\n")
    else:
        path.unlink(missing_ok=True)


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
    cfg.update_from_flattened_dict({**traverse_util.flatten_dict(saved, sep="."), **(overrides or {})})
    return cfg


def load_run(workdir, overrides=None, step=None):
    """(cfg, tokenizer, graphdef, params, step) of the run in `workdir` at checkpoint `step` (default:
    the newest).

    The tokenizer is `data.tokenizer` if set, else workdir/tokenizer.model. DataError if the workdir
    has no config.json, no tokenizer or no checkpoint.
    """
    cfg = load_config(workdir, overrides)
    step = checkpoint.manager(workdir, cfg.train).latest_step() if step is None else step
    graphdef, params = checkpoint.load_params(cfg, workdir, step)
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
