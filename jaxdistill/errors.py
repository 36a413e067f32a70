"""Errors a user can fix, and how the command line shows them.

Library code raises ordinary exceptions (`ValueError` for a bad config field, `FileNotFoundError`
for a missing file, ...) whose message names the field or file and says what to do. The command
lines (`run.py`, `python -m jaxdistill.convert.edm_pickle`) print such an error as the single line
`error: <message>` and exit with code 2; `--verbose` or `JAXDISTILL_VERBOSE=1` shows the traceback.
"""
from __future__ import annotations

import errno
import os
import sys


class UserError(Exception):
    """An input or situation the user can fix (a locked workdir, an incompatible checkpoint)."""


class WorkdirLockedError(UserError):
    """Another live run holds the workdir."""


class IncompatibleCheckpointError(UserError, ValueError):
    """The saved state's structure differs from the one the current config builds."""


class NonFiniteStateError(UserError, FloatingPointError):
    """The loss or the state went NaN / Inf; nothing from it was saved."""


# What the command lines turn into one line; anything else keeps its traceback (a bug).
ONE_LINE_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   IsADirectoryError, PermissionError, KeyError)


def verbose_requested(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--verbose" in argv or os.environ.get("JAXDISTILL_VERBOSE", "") not in ("", "0")


def one_line(e: BaseException) -> str | None:
    """`error: ...` for an error the user can fix, or None for one that needs its traceback."""
    full = _disk_full(e)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return (f"error: the disk is full{where}: free space (or choose another --workdir) and "
                "rerun; saved checkpoints are kept and the run resumes from the newest")
    if not isinstance(e, ONE_LINE_ERRORS):
        return None
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "error: " + " ".join(message.split())


def _disk_full(e: BaseException | None, depth: int = 0) -> OSError | None:
    """The ENOSPC OSError in `e`'s cause / context chain (async writers wrap it), if any."""
    if e is None or depth > 8:
        return None
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return e
    if "No space left on device" in str(e):
        return OSError(errno.ENOSPC, "No space left on device")
    return _disk_full(e.__cause__ or e.__context__, depth + 1)
