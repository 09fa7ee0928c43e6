"""The errors a user can fix, as opposed to bugs.

Everything a user can cause — a bad config value, an unreadable data file, a broken model file, a wrong
resume folder — raises a subclass of `UserError`. The CLI (`seal_jax.config.cli_main`) prints such an
error as one line (plus its hint) and exits non-zero; any other exception is a bug and keeps its
traceback. `--debug` or `SEAL_DEBUG=1` shows the traceback of user errors too.

This module imports nothing from seal_jax, so any module (the model loaders included) can use it.
"""
from __future__ import annotations

from typing import Optional

def brief(error: BaseException, limit: int = 300) -> str:
    """An error's first line (its type's name if it has no message), short enough for a log line and a
    record's reason."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


EXIT_USER_ERROR = 2  # like argparse/absl usage errors: the input is wrong, not the program
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program


class UserError(Exception):
    """An error the user can fix; `str(e)` is one line naming the field, file or item at fault."""

    def __init__(self, message: str, *, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message on one line: embedded newlines (e.g. from a wrapped exception) are folded."""
        return " ".join(str(self).split())


class DataError(UserError, ValueError):
    """A data file (passages, self-edits, records) is unreadable or malformed; names file and item."""


class RunDirError(UserError):
    """A run directory cannot be created, or a folder cannot be resumed as this run."""


class Interrupted(Exception):
    """The run stopped at a safe point after SIGINT/SIGTERM; `hint` says how to resume.

    Not a `UserError`: nothing is wrong, and the CLI exits with `EXIT_INTERRUPTED` instead.
    """

    def __init__(self, message: str = "interrupted", *, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint
