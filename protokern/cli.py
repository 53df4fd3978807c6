"""Errors a user can read, for the command-line entry points (``python -m protokern.train`` / ``.explain``)."""

from __future__ import annotations

import contextlib
import sys

# bad input: paths, settings, corrupt / unsafe / unfitting checkpoints (protokern.checkpoint.CheckpointError is
# a ValueError), unreadable images and data
INPUT_ERRORS = (OSError, ValueError)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def exit_on_error(prog: str, argv: list[str] | None = None, stopped: tuple[type[BaseException], ...] = ()):
    """Turn an error of the block into one line on stderr (``PROG: error: ...``) and ``SystemExit``: code 1
    for ``stopped`` (a run that cannot go on), code 2 for :data:`INPUT_ERRORS`. Other errors, Ctrl-C and
    everything with ``--debug`` in ``argv`` (default ``sys.argv``) keep their traceback."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        yield
    except stopped as error:
        if debug:
            raise
        _report(prog, error, 1)
    except INPUT_ERRORS as error:
        if debug:
            raise
        _report(prog, error, 2)


def _report(prog: str, error: BaseException, code: int):
    print(f"{prog}: error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(code) from None
