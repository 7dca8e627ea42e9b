"""One-line errors for bad configs and bad data (the CLI prints them without a traceback)."""


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


class DataError(ValueError):
    """Input data or a tokenizer cannot be used; the message names the file or field."""


def exit_on_error(main):
    """Wraps a CLI `main` so that a ConfigError or DataError prints one line and exits with 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ConfigError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
