"""One-line errors for bad configs and bad data (the CLI prints them without a traceback), and the
CLI's one-line exit on Ctrl-C."""

import functools
import logging
import os
import re
import signal
import sys
import warnings

from absl import app, flags
from absl import logging as absl_logging

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


class DataError(ValueError):
    """Input data or a tokenizer cannot be used; the message names the file or field."""


class DivergenceError(ArithmeticError):
    """Training diverged (a loss spike); the message names the step and the last good checkpoint."""


class NonFiniteError(DivergenceError):
    """Training produced a non-finite loss, gradient or parameters; the message names the step."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored; the message names it and the cause."""


class RunFileError(RuntimeError):
    """A file of the run beside its checkpoints (metrics.jsonl, TensorBoard events) could not be
    written, e.g. on a full disk; the message names it and the cause."""


def cause(e):
    """"Type: first line" of the innermost cause of exception `e` (at most 200 characters); an OS
    error that tensorstore (orbax's writer) reports inside a long status reads as that OSError."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    code = re.search(r"\[os_error_code='(\d+)'\]", str(e))
    if code:
        return f"OSError: [Errno {code[1]}] {os.strerror(int(code[1]))}"
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= 200 else line[:197] + "..."


def config_file_error(path, e):
    """The one-line ConfigError for a config file that cannot be loaded (`e`: why)."""
    while isinstance(e, OSError) and e.__cause__:  # config_flags wraps the OSError that says why
        e = e.__cause__
    why = f"syntax error at line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError) else cause(e)
    return ConfigError(f"config file {path} cannot be loaded ({why})")


def _failing_file(e):
    """The file of the innermost frame of `e` (the config file that raised it)."""
    if isinstance(e, SyntaxError):
        return e.filename
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def exit_now(message):
    """Prints `message` on stderr and ends the process at once with INTERRUPTED_EXIT_CODE.

    os._exit skips the interpreter's teardown, which is what crashes after a Ctrl-C during start-up:
    the interrupted jit leaves XLA compiling on a worker thread, and teardown frees the client under
    it (a segfault in xla::ifrt::SingleDeviceSharding::Create); an interrupted `import jax` crashes
    in nanobind's module cleanup. Nothing else is running that needs an orderly end: before
    training there is nothing to save, and the loop waits for its checkpoints itself.
    """
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def exit_on_signal(message):
    """Until the training loop installs its own handler: SIGINT and SIGTERM call `exit_now(message)`.
    A CLI calls this first, before importing jax."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: exit_now(message))


def exit_on_error(main):
    """Wraps a CLI `main`: a ConfigError, DataError or usage error (absl's app.UsageError, e.g. a
    positional argument: not absl's page of usage text) prints one line and exits with 2, a
    DivergenceError, CheckpointError or RunFileError (the run stopped) prints one line and exits with 1, a
    KeyboardInterrupt prints its message (one line) and exits at once with 130 (`exit_now`)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError, app.UsageError, DivergenceError, CheckpointError, RunFileError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1 if isinstance(e, (DivergenceError, CheckpointError, RunFileError)) else 2)
        except KeyboardInterrupt as e:
            exit_now(str(e) or "interrupted")

    return wrapped


def quiet_library_logs():
    """Unless the command line set -v/--verbosity: library logs (absl, jax's backend probing, orbax)
    at ERROR only, so a CLI prints colax's own lines. Call it in a CLI's main, after flag parsing.
    Always: the "Event loop is closed" and "exception was never retrieved" errors of a failed async
    save and the "coroutine ... was never awaited" warnings of its abandoned orbax writes (printed at
    exit) are not printed (`_QuietUnraisable`; asyncio's logger; a warnings filter), the save's own
    error is."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=_ABANDONED_WRITE, category=RuntimeWarning)
    if not isinstance(sys.unraisablehook, _QuietUnraisable):
        sys.unraisablehook = _QuietUnraisable(sys.unraisablehook)


# orbax's serializer coroutines (`_src/serialization/serialization.py`: async_serialize,
# async_serialize_from_host and its write_fragment) that a failed save leaves unawaited.
_ABANDONED_WRITE = r"coroutine 'async_serialize[^']*' was never awaited"


class _QuietUnraisable:
    """An unraisable-exception hook that drops RuntimeError("Event loop is closed"): after an async
    checkpoint save failed (a full disk), tensorstore still completes its futures on orbax's closed
    event loop, dozens of times, while the save's own error is reported in one line
    (`checkpoint.check_saves`). Everything else goes to the `previous` hook."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            self.previous(unraisable)


_HELP_FLAGS = ("help", "h", "?", "helpshort", "helpfull", "helpxml")


def parse_flags(argv):
    """A flags parser for `absl.app.run(main, flags_parser=parse_flags)`: a bad flag, e.g. an
    override of a config key that does not exist, prints one line and exits with 2; --help exits 0."""
    try:
        return flags.FLAGS(argv)
    except SystemExit:  # absl's --help/-h/--helpfull print the usage, then exit 1: asked-for help is success
        if any(a.split("=")[0].lstrip("-") in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e).splitlines()[0]
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
        key = re.search(r"(\w+)\\*'", str(e)).group(1)
        names = [a.split("=")[0] for a in argv[1:]]
        message = next((n for n in names if f".{key}." in n + "."), key) + ": no such config key"
        hint = re.search(r'Did you mean "(\w+)"', str(e))
        message += f" (did you mean {hint.group(1)}?)" if hint else ""
    except Exception as e:  # pylint: disable=broad-except  # config_flags runs the --config file while parsing
        message = str(config_file_error(_failing_file(e), e))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
