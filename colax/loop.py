"""The training loop: `run(cfg, workdir)` pre-trains from scratch or resumes the run in `workdir`.

Every check that can fail on a bad config or bad data (config, workdir, tokenizer vocab, sample
prompt) runs before anything is compiled, and before anything is written into the workdir, which
the run holds locked (`colax.workdir.lock`). Each optimizer step takes `train.batch_size` sequences from the train
pipeline, reshaped on the host from [B, T] to [A, B / A, T] micro-batches (A = accumulation steps).
The metrics of step t are fetched only after step t + 1 is dispatched, except before a checkpoint
or an evaluation, which wait for the step's metrics so that no non-finite state is ever saved.
"""

import contextlib
import functools
import itertools
import json
import math
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx

from colax import checkpoint, convert, data, distributed, evaluate, generate, metrics, optim, sharding, state, tokenizer
from colax import trainer as trainer_lib
from colax import config as config_lib
from colax import guard as guard_lib
from colax import model as model_lib
from colax import run as run_lib
from colax import workdir as workdir_lib
from colax.errors import ConfigError, DataError, DivergenceError


def device_batch(batch, accum, mesh):
    """A host batch (dict of [b, T] numpy arrays) -> global [A, B / A, T] arrays on the mesh."""
    return sharding.global_batch({k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}, mesh)


def unigram_ppl(cfg, tok, val):
    """Perplexity on `val` (this host's share of the validation batches) of the add-one-smoothed
    unigram model of `train.baseline_batches` global train batches: counts and sums are over every
    host's rows (`distributed.global_sum`), so any number of hosts gives one process's figure."""
    counts = np.zeros(tok.vocab_size, np.int32)
    train = data.make_pipeline(cfg.data, tok, split="train", global_batch_size=cfg.train.batch_size,
                               num_epochs=1)
    for b in itertools.islice(train, cfg.train.baseline_batches):
        counts += np.bincount(b["targets"][b["loss_mask"] > 0], minlength=tok.vocab_size).astype(np.int32)
    counts = distributed.global_sum(counts) + 1.0
    logp = np.log(counts / counts.sum())
    nll, targets = 0.0, 0.0
    for b in val:
        nll, targets = nll - (logp[b["targets"]] * b["loss_mask"]).sum(), targets + b["loss_mask"].sum()
    nll, targets = distributed.global_sum(np.float32([nll, targets]))
    return math.exp(nll / max(targets, 1.0))


def init_from(cfg, workdir, mngr, tx, params, opt_state):
    """(params, opt_state) a new run starts from: `train.init_from`'s parameters (a colax workdir or
    safetensors, `convert.init_params`), else those of a workdir that `colax.convert import` wrote
    (its only checkpoint is step 0), else the freshly initialised `params`."""
    source = cfg.train.init_from or (workdir if mngr.latest_step() == 0 else "")
    if not source:
        return params, opt_state
    params = convert.init_params(cfg, params, source)
    return params, jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, opt_state))(params)


class StopOnSignal:
    """SIGTERM and SIGINT while a run is active (`run`). Outside the training steps (start-up, the
    final report) they raise KeyboardInterrupt(`message`) at once: the CLI prints it and exits
    (`errors.exit_on_error`). Inside `while_training()` the first one sets `requested` (the loop then
    saves and returns) and a second one raises KeyboardInterrupt at once.

    A KeyboardInterrupt raised where Python swallows exceptions (a `__del__`, a gc callback such as
    jax's `_xla_gc_callback`) is not lost: it is kept out of stderr (`sys.unraisablehook`) and raised
    again at the next `check()` (the loop checks between start-up stages and on entering training)."""

    def __init__(self, message):
        self.message, self.training, self.requested, self.interrupted = message, False, False, False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested or not self.training:
            self.interrupted = True
            raise KeyboardInterrupt(self.message)
        self.requested = signal.Signals(signum).name

    def _unraisable(self, unraisable):
        if not (self.interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            self.previous_hook(unraisable)

    def check(self):
        """Raises KeyboardInterrupt(`message`) if a signal's KeyboardInterrupt was swallowed."""
        if self.interrupted:
            raise KeyboardInterrupt(self.message)

    @contextlib.contextmanager
    def while_training(self, message):
        """Signals ask the loop to stop; a second one raises KeyboardInterrupt(`message`)."""
        self.check()
        self.training, self.message = True, message
        try:
            yield self
        finally:
            self.training = False

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = self.previous_hook
        if exc == (None, None, None):
            self.check()


class Logger:
    """Passes each step's metrics through the divergence guard, feeds the progress bar, writes metrics.jsonl."""

    def __init__(self, cfg, workdir, spec, start, guard):
        t = cfg.train
        self.cfg, self.guard = cfg, guard
        self.lr = functools.partial(optim.lr, cfg.optim, t.steps)  # of each phase (`optim.lr`)
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.flops_per_token = model_lib.flops_per_token(spec, cfg.data.seq_len)["train"]
        self.writer = metrics.Writer(workdir, start)
        self.progress = metrics.Progress(start, t.steps)
        self.mark = None  # (time, step) where the current throughput window starts
        self.tokens_per_s = None

    def step(self, s, device_metrics, extra=None):
        """Fetches step s's metrics and passes them through the divergence guard (which may raise)."""
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.guard.check(s, m, m.pop("finite") > 0)
        now = time.time()
        log = s % self.cfg.train.log_every == 0 or s == self.cfg.train.steps or extra
        if self.mark is None:
            self.mark = (now, s)
        elif log:
            self.tokens_per_s = (s - self.mark[1]) * self.tokens_per_step / (now - self.mark[0])
            self.mark = (now, s)
        self.progress.update(s, m["loss"], self.tokens_per_s, extra)
        if log:
            rate = self.tokens_per_s
            self.writer.write(dict(
                step=s, **m, lr=self.lr(s - 1), tokens_per_s=rate, skipped_steps=self.guard.skipped,
                mfu=None if rate is None else metrics.mfu(self.flops_per_token, rate), **(extra or {})))


def run(cfg, workdir, overwrite=False, stop_after=None):
    """Trains `cfg` in `workdir` (resuming its latest checkpoint) to `train.steps`.

    `stop_after` (a step) behaves like a SIGTERM after that step: save, then return. A warmup not
    shorter than the run is cut to 10% of it, with a notice (`config.fit_warmup`).
    Returns the final {"eval_loss", "eval_ppl"}, or None when stopped early. SIGINT/SIGTERM: see
    StopOnSignal (before the first step: KeyboardInterrupt("interrupted before step 0, nothing saved")).
    """
    with StopOnSignal("interrupted before step 0, nothing saved") as stop:
        try:
            result = _run(cfg, workdir, overwrite, stop_after, stop)
        except Exception as e:  # a peer lost in a multi-host run is the cause (colax.distributed)
            distributed.on_error(e)
            raise
    distributed.on_success()
    return result


def prepare(cfg, spec, workdir, overwrite):
    """Every check that reads the workdir or the data, then (only once all passed) its writes: the
    replaced run's files deleted (`overwrite`), tokenizer.model and config.json. Returns (tokenizer,
    resume step: `train.resume_step`, or 0 when config.json shows that this resume was already
    done, the train iterator from the first batch: opening it reads and checks the data, make_train:
    start_batch -> the train iterator from that global batch)."""
    t = cfg.train
    old, replace = run_lib.check_workdir(workdir, cfg, overwrite)
    done = old and old["train"].get("resume_step") == t.resume_step
    checkpoint.check_resume_step(workdir, 0 if done else t.resume_step)
    checkpoint.check_writable(checkpoint.directory(workdir))
    tok, proto = tokenizer.find_or_train(cfg.data, workdir, spec.vocab_size, reuse=not replace)
    tokenizer.check_vocab(tok, spec.vocab_size)
    if t.sample_prompt and t.sample_tokens:
        try:
            generate.check_prompts([tok.encode(t.sample_prompt)], cfg.data.seq_len, "data.seq_len")
        except DataError as e:
            raise ConfigError(f"train.sample_prompt: {e}") from None
    make_train = functools.partial(data.make_pipeline, cfg.data, tok, split="train", global_batch_size=t.batch_size)
    train_it = make_train(start_batch=0)
    run_lib.write_workdir(workdir, cfg, replace)  # checked above: config.json is read once
    if proto is not None and jax.process_index() == 0:
        workdir_lib.atomic_write(tok.path, proto)
    changes = run_lib.recovery_changes(old, json.loads(cfg.to_json_best_effort())) if old else []
    if changes:
        print(f"resuming with changed recovery settings: {', '.join(changes)}", flush=True)
    return tok, 0 if done else t.resume_step, (train_it, make_train)


def _run(cfg, workdir, overwrite, stop_after, stop):
    cfg, notice = config_lib.fit_warmup(cfg)
    if notice and jax.process_index() == 0:
        print(notice, flush=True)
    spec = config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    state.validate(spec, mesh, cfg.train.batch_size)
    with workdir_lib.lock(workdir, jax.process_index() == 0):  # one lock per run: process 0 holds it
        tok, resume_step, train_data = prepare(cfg, spec, workdir, overwrite)
        try:
            return _train(cfg, spec, mesh, tok, train_data, workdir, resume_step, stop_after, stop)
        except DivergenceError:  # the advised resume_step is honoured even if an earlier go-back used it
            run_lib.forget_resume_step(workdir)
            raise


def _restore(cfg, spec, mesh, trainer, mngr, train_data, resume_step):
    """(start, params, opt_state, train iterator) of the checkpoint a run resumes from, on this run's
    mesh and hosts (`checkpoint.restore`): a source with a row store continues at global batch
    `start` whatever the topology that saved it; a line says when the topology changed."""
    streamed = data.is_streamed(cfg.data)
    train_it, make_train = train_data
    target = lambda step: state.abstract_state(spec, trainer.tx(step), mesh)  # the state of its step's phase
    start, params, opt_state, saved = checkpoint.restore(mngr, target, train_it if streamed else None, resume_step)
    now = checkpoint.topology()
    if any(saved.get(k) not in (None, v) for k, v in now.items()):
        workdir_lib.note(f"checkpoint {start} was written by {checkpoint.describe(saved)}; resuming on "
                         f"{checkpoint.describe(now)}: the state is resharded onto the new mesh and the data "
                         f"continues at global batch {start}")
    return start, params, opt_state, train_it if streamed else make_train(start_batch=start)


def _train(cfg, spec, mesh, tok, train_data, workdir, resume_step, stop_after, stop):
    """The body of `run` once the workdir is locked and prepared."""
    accum, t = config_lib.accum_steps(cfg), cfg.train
    trainer = trainer_lib.Trainer(cfg, nnx.graphdef(model_lib.abstract_model(spec)), mesh)
    if resume_step:  # resuming from a chosen checkpoint starts a new branch: earlier pins are released
        run_lib.write_pinned(workdir, set())
    guard = guard_lib.Guard(t, run_lib.read_pinned(workdir), lambda pinned: run_lib.write_pinned(workdir, pinned))
    mngr = checkpoint.manager(workdir, t, guard.pinned, owner=True)
    if distributed.watchdog():
        distributed.watchdog().watch(checkpoint.directory(workdir))
    start = 0
    if mngr.latest_step() or resume_step:  # restored straight into the shardings: no fresh parameters
        stop.message = f"interrupted before resuming at step {resume_step or mngr.latest_step()}, nothing saved"
        graphdef = trainer.graphdef
        start, params, opt_state, train_it = _restore(cfg, spec, mesh, trainer, mngr, train_data, resume_step)
        guard.resumed(start, mngr.all_steps())
    else:
        graphdef, params, opt_state = state.init_state(spec, trainer.tx(0), mesh, t.seed)
        params, opt_state = init_from(cfg, workdir, mngr, trainer.tx(0), params, opt_state)
        train_it = train_data[0]
    saved_it = train_it if data.is_streamed(cfg.data) else None  # a row store resumes by global batch
    stop.check()  # an interrupt swallowed while the state was compiled (e.g. in a gc callback)
    val = list(evaluate.val_batches(cfg, tok, t.batch_size // accum, t.eval_batches))
    evaluate_fn = evaluate.make_evaluate(graphdef, params, mesh, val)
    whole_split = lambda: evaluate.val_batches(cfg, tok, t.batch_size // accum)
    final_eval = lambda params: evaluate_fn(params, whole_split(), t.final_eval_tokens)
    log = Logger(cfg, workdir, spec, start, guard)
    guard.remember(metrics.logged_losses(workdir, start) if start else [])
    log.progress.write(f"{'resuming at' if start else 'starting'} step {start}/{t.steps}: "
                       f"{model_lib.count_params(spec)['total'] / 1e6:.2f}M parameters, {accum} micro-batch(es) "
                       f"of {t.batch_size // accum} x {cfg.data.seq_len} tokens per step")
    config = json.loads(cfg.to_json_best_effort())
    pending, s, result, signalled = None, start, None, False
    with stop.while_training("interrupted again: stopped without saving; the last checkpoint stays valid"):
        try:
            for s in range(start + 1, t.steps + 1):
                params, opt_state, m = trainer(s, params, opt_state, device_batch(next(train_it), accum, mesh))
                if pending:
                    log.step(*pending)
                checkpoint.check_saves(mngr)  # a failed async save stops the run at once
                pending = (s, m)
                signalled = distributed.any_process(stop.requested)  # one signalled host: every host stops at s
                stopping = signalled or s == stop_after
                evaluating = s == t.steps or (t.eval_every and s % t.eval_every == 0)
                saving = s == t.steps or stopping or s % t.checkpoint_every == 0
                if evaluating or saving:  # wait for step s's metrics: a NaN state is never saved
                    result = (final_eval(params) if s == t.steps else evaluate_fn(params)) if evaluating else None
                    log.step(*pending, extra=result)
                    pending = None
                if saving and guard.in_streak:  # the state of a skipped non-finite step is never saved
                    log.progress.write(f"step {s} was skipped as non-finite: no checkpoint saved")
                elif saving:
                    checkpoint.save(mngr, s, params, opt_state, saved_it, config)
                    guard.saved(s)
                    log.progress.write(f"saving checkpoint {checkpoint.step_dir(workdir, s)}")
                if stopping:
                    break
            checkpoint.check_saves(mngr, wait=True)
        finally:
            log.progress.close()
            log.writer.close(stopping_on_error=sys.exc_info()[1] is not None)
            _wait_quietly(mngr)
            if guard.diverged is not None:  # saved from the parameters that gave the loss the run stopped on
                checkpoint.set_aside(mngr, guard.diverged, "diverged")
    newest = "no checkpoint saved" if guard.last_saved is None else (
        f"checkpoint {checkpoint.step_dir(workdir, guard.last_saved)} saved")
    stop.message = f"interrupted after step {s}, {newest}"
    if s < t.steps:
        why = stop.requested or ("a signal to another process" if signalled else "--stop_after")
        log.progress.write(f"stopped after step {s} ({why}); {newest}, run the same "
                           "command to resume")
        return None
    result = result or final_eval(params)
    _report(cfg, tok, graphdef, params, result, itertools.islice(whole_split(), result["eval_batches"]), log)
    log.progress.write("no checkpoint saved" if guard.last_saved is None else
                       f"checkpoint: {checkpoint.step_dir(workdir, guard.last_saved)}")
    return result


def _wait_quietly(mngr):
    """Waits for the saves in flight when the loop ends by an exception (that exception is the one
    reported: a failed save was already raised by `checkpoint.check_saves` where it mattered)."""
    try:
        mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
        pass


def _report(cfg, tok, graphdef, params, result, val, log):
    """Prints the final validation loss and perplexity (`result`, over the validation batches `val`)
    with the tokens it covers, the unigram baseline's on `val`, and a sample."""
    ppl = result["eval_ppl"]  # a diverged model's (up to e^700) in scientific notation, not 300 digits
    budget = cfg.train.final_eval_tokens
    covers = "the whole split" if not budget or result["eval_tokens"] <= budget else "the split's first"
    line = (f"validation ({covers}, {result['eval_tokens']:,} tokens): loss {result['eval_loss']:.4f}, "
            f"perplexity {f'{ppl:.2f}' if ppl < 1e6 else f'{ppl:.3e}'}")
    if cfg.train.baseline_batches:
        line += f" (unigram baseline {unigram_ppl(cfg, tok, val):.2f})"
    log.progress.write(line)
    t = cfg.train
    if t.sample_prompt and t.sample_tokens:
        prompt = tok.encode(t.sample_prompt)
        (ids,), _ = generate.generate(params, graphdef, [prompt], t.sample_tokens, tok.eos_id, cfg.data.seq_len,
                                      t.sample_temperature, seed=t.seed)
        log.progress.write(f"sample: {t.sample_prompt + tok.decode([int(i) for i in ids])!r}")
