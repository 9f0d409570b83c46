"""User-facing errors.

Raise :class:`UserError` for anything the user can fix (bad path, bad value,
inconsistent inputs). The CLI prints it as one line, exits non-zero and shows
no traceback. Use ``assert`` only for our own invariants.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input, with a message that says what to do.

    The message should name the input (path or option) and the offending value,
    say what is wrong, and suggest the fix, all on one line.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class WeightsUnavailableError(UserError):
    """Requested pretrained weights cannot be found offline or online."""
