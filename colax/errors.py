"""One-line errors for bad configs and bad data (the CLI prints them without a traceback), and the
CLI's one-line exit on Ctrl-C."""

import os
import signal
import sys

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


class DataError(ValueError):
    """Input data or a tokenizer cannot be used; the message names the file or field."""


class NonFiniteError(ArithmeticError):
    """Training produced a non-finite loss or gradient; the message names the step."""


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
    """Wraps a CLI `main`: a ConfigError or DataError prints one line and exits with 2, a
    NonFiniteError prints one line and exits with 1, a KeyboardInterrupt prints its message (one
    line) and exits at once with 130 (`exit_now`)."""
    import functools

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError, NonFiniteError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1 if isinstance(e, NonFiniteError) else 2)
        except KeyboardInterrupt as e:
            exit_now(str(e) or "interrupted")

    return wrapped


def parse_flags(argv):
    """A flags parser for `absl.app.run(main, flags_parser=parse_flags)`: a bad flag, e.g. an
    override of a config key that does not exist, prints one line and exits with 2."""
    import re

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e).splitlines()[0]
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
        key = re.search(r"(\w+)\\*'", str(e)).group(1)
        names = [a.split("=")[0] for a in argv[1:]]
        message = next((n for n in names if f".{key}." in n + "."), key) + ": no such config key"
        hint = re.search(r'Did you mean "(\w+)"', str(e))
        message += f" (did you mean {hint.group(1)}?)" if hint else ""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
