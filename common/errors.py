"""The product's one error base class and the one exit-code rule of every command line.

Every error class of `common/`, `client/`, `server/` and `simulations/` derives from
`FedinterestError` (keeping its builtin base too, e.g. `class StoreError(FedinterestError,
ValueError)`, so that `except ValueError` still catches it); tests/test_errors.py checks
that no error class is left without it.

The exit code of `fedinterest` and `fedinterest-device` (Unix and argparse convention):

- 0: the command did what it was asked;
- 2 (`EXIT_USAGE`): a usage or user-fixable error, found before any job ran: a bad
  command line, config, input file or key, missing or invalid state the user can fix
  (no deployment directory, the SuperLink not started, a run that has not finished);
  the message says what to fix and nothing was done;
- 1 (`EXIT_FAILED`): a job ran and failed (`JobFailed`): a simulation whose Flower run
  did not complete, `server run --wait` whose run did not complete.

`run_command` applies the rule; common/cli_errors.py puts it around every command of a
typer app, so no command catches errors of its own to choose a code. This module imports
nothing: the device side, the ServerApp and the ClientApp all import it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class FedinterestError(Exception):
    """The product's own errors: a message naming what and where, meant to be shown to the user."""


class UsageError(FedinterestError, ValueError):
    """A command line or input the user can fix, found by a command's own checks (exit code 2)."""


class JobFailed(FedinterestError):
    """A job that ran and did not succeed (exit code 1); every other FedinterestError is the user's to fix (2)."""


def exit_code(err: BaseException) -> int:
    """The exit code of a command that ended with `err`: 1 for a job that ran and failed, else 2."""
    return EXIT_FAILED if isinstance(err, JobFailed) else EXIT_USAGE


def report(err: BaseException, echo: Callable[[str], Any] | None = None) -> int:
    """Show `err` as one `error: <message>` line on stderr; its exit code."""
    line = f"error: {err}"
    if echo is None:
        print(line, file=sys.stderr, flush=True)
    else:
        echo(line)
    return exit_code(err)


def run_command(
    command: Callable[[], Any],
    user_errors: tuple[type[BaseException], ...] = (),
    echo: Callable[[str], Any] | None = None,
) -> int:
    """Run `command`: 0, or the rule's exit code after one `error:` line for a FedinterestError.

    `user_errors`: builtin exceptions a command line treats as the user's to fix as well (the
    device commands: ValueError and OSError, e.g. an unreadable file or a rejected policy value)."""
    try:
        command()
    except FedinterestError as err:
        return report(err, echo)
    except user_errors as err:
        return report(err, echo)
    return EXIT_OK
