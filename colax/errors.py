"""One-line errors for bad configs and bad data (the CLI prints them without a traceback)."""


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


class DataError(ValueError):
    """Input data or a tokenizer cannot be used; the message names the file or field."""


class NonFiniteError(ArithmeticError):
    """Training produced a non-finite loss or gradient; the message names the step."""


def exit_on_error(main):
    """Wraps a CLI `main`: a ConfigError or DataError prints one line and exits with 2, a
    NonFiniteError prints one line and exits with 1."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError, NonFiniteError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1 if isinstance(e, NonFiniteError) else 2)

    return wrapped


def parse_flags(argv):
    """A flags parser for `absl.app.run(main, flags_parser=parse_flags)`: a bad flag, e.g. an
    override of a config key that does not exist, prints one line and exits with 2."""
    import re
    import sys

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
