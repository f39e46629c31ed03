"""One error type for everything a user can get wrong, and the one place that reports it.

Bad input (a config key, a path, a checkpoint, a prompt) raises `UserError` wherever it is
detected, with a message that names the culprit. The entry points wrap their `main` in
`report_user_errors`, which prints that one line to stderr and exits with status 2; `--debug`
re-raises so the traceback is there when someone wants it.
"""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """An error caused by the user's input; its message is shown as-is, without a traceback."""


@contextmanager
def report_user_errors(debug: bool = False):
    try:
        yield
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
