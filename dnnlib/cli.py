"""What the command-line scripts share: option types checked by the parser, and the
wrapper that turns a user's mistake into one `Error: ...` line instead of a traceback."""

import functools
import math

import click

from .util import parse_range

# What a user's input or environment causes: the library raises these with a message that
# names the file or option (CheckpointError and DatasetError are ValueErrors; a full disk,
# a missing or unreadable file are OSErrors). Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError)


def error_message(error: BaseException) -> str:
    """One line for a user error: an OSError as '<file>: <reason>', anything else as its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f'{error.filename}: {error.strerror}'
    text = str(error)
    if '\nOriginal Traceback' in text:     # raised in a DataLoader worker: torch's message holds the worker's traceback
        last = text.rstrip().splitlines()[-1]          # '<module>.<Class>: <message>'
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


def user_errors(command):
    """Decorator for a click command's function: USER_ERRORS -> click.ClickException (exit status 1)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(error_message(e)) from e
    return wrapper


class Seeds(click.ParamType):
    """'0-3,7' -> [0, 1, 2, 3, 7]; every seed in [0, 2**32), the range numpy's RandomState takes."""
    name = 'seeds'

    def convert(self, value, param, ctx):
        try:
            seeds = parse_range(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        for seed in seeds:
            if not 0 <= seed < 2 ** 32:
                self.fail(f'seed {seed} is outside [0, 2**32)', param, ctx)
        return seeds


class FiniteFloat(click.FloatRange):
    """A float that is not nan or +-inf (click.FloatRange lets them through), optionally in a range."""
    name = 'float'

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value

    def _describe_range(self) -> str:
        # --help shows the range; click would print 'x<=None' for a float without bounds.
        return super()._describe_range() if self.min is not None or self.max is not None else ''
