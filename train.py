"""Pre-trains a (CoLA) LLaMA model from scratch, or resumes the run in --workdir.

  python train.py --config configs/cola_350m.py --workdir runs/cola_350m [--config.train.steps=1000]
  python train.py --config configs/cola_350m.py --workdir /tmp/smoke --smoke   # a quick check of the config

Rerunning the same command resumes from the newest checkpoint; SIGTERM/SIGINT save and exit (before
the first step they exit at once: "interrupted before step 0, nothing saved", exit code 130);
--stop_after=N saves and stops after step N.
A workdir holding a run of another config is refused unless --overwrite. Multi-host: run the same
command on every host (docs/sharding.md). See docs/training.md.
"""

from colax import errors, host, supervisor

supervisor.supervise()  # a multi-process launch runs as a supervised child (colax.supervisor)
errors.exit_on_signal("interrupted before step 0, nothing saved")  # Ctrl-C while jax is imported
host.reuse_freed_memory()  # on a CPU backend, before JAX starts its threads (colax.host)

from absl import app, flags  # noqa: E402 (after the signal handler)
from ml_collections import config_flags  # noqa: E402

from colax import config, distributed, loop  # noqa: E402
from colax.errors import exit_on_error, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: config, tokenizer, checkpoints, metrics.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a run of another config in --workdir.")
_SMOKE = flags.DEFINE_bool("smoke", False, f"A quick end-to-end check of the config: {config.SMOKE_STEPS} steps "
                           "(or --config.train.steps) of one sequence per device, one validation batch, no "
                           "baseline, a short sample (colax.config.smoke).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-host run by jax's cluster detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT,
                                  "Multi-host: seconds without a peer's heartbeat before every process stops.",
                                  lower_bound=1)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Save a checkpoint and stop after this step (the same "
                                   "command resumes), e.g. before moving the run to another number of hosts.",
                                   lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


@exit_on_error
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    errors.quiet_library_logs()  # orbax: INFO per save, WARNINGs per read-only look at checkpoints; -v 0 shows them
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value,
                           heartbeat_timeout=_HEARTBEAT.value)
    cfg = config.from_flag(_CONFIG)
    if _SMOKE.value:
        cfg = config.smoke(cfg, cfg.train.steps if "config.train.steps" in flags.FLAGS else config.SMOKE_STEPS)
        t = cfg.train
        print(f"notice: --smoke: {t.steps} steps of {t.batch_size} x {cfg.data.seq_len} tokens, "
              f"{t.eval_batches} validation batch, no baseline, a {t.sample_tokens}-token sample", flush=True)
    loop.run(cfg, _WORKDIR.value, overwrite=_OVERWRITE.value, stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
    app.run(distributed.end_directly(main), flags_parser=parse_flags)
