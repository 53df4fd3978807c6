"""Errors a user can read, for the command-line entry points (``python -m protokern.train`` / ``.explain``)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from protokern.utils import printable

# bad input: paths, settings, corrupt / unsafe / unfitting checkpoints (protokern.checkpoint.CheckpointError is
# a ValueError), unreadable images and data, ImageNet weights neither cached nor downloadable
# (protokern.models.backbones.WeightsUnavailableError is an OSError)
INPUT_ERRORS = (OSError, ValueError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (whitespace runs, newlines included, become one space), printable (a file
    or class name's control characters as escapes: :func:`protokern.utils.printable`)."""
    return printable(" ".join(str(error).split())) or type(error).__name__


class ErrorMode:
    """What :func:`exit_on_error` yields: set ``debug`` once the settings are parsed (a config file's
    ``debug: true``) to keep the tracebacks of later errors."""

    def __init__(self, debug: bool):
        self.debug = debug


@contextlib.contextmanager
def exit_on_error(prog: str, argv: list[str] | None = None, stopped: tuple[type[BaseException], ...] = ()):
    """Turn an error of the block into one line on stderr (``PROG: error: ...``) and ``SystemExit``: code 1
    for ``stopped`` (a run that cannot go on), code 2 for :data:`INPUT_ERRORS`; warnings shown meanwhile are one
    line each (``PROG: warning: ...``). Other errors, Ctrl-C and everything in debug mode keep their traceback
    (and warnings their source line): debug mode is the last of ``--debug`` / ``--no-debug`` in
    ``argv`` (default ``sys.argv``), or what the block sets on the yielded :class:`ErrorMode`."""
    argv = sys.argv[1:] if argv is None else argv
    flags = [arg for arg in argv if arg in ("--debug", "--no-debug")]
    mode = ErrorMode(bool(flags) and flags[-1] == "--debug")
    shown = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        """A warning as ``PROG: warning: ...`` on one line, without the source line that raised it; one from
        another package (torch, numpy, PIL) with its kind and place (debug mode: Python's own form)."""
        if mode.debug:
            return shown(message, category, filename, lineno, line)
        text = one_line(message)
        if not os.path.abspath(str(filename)).startswith(_PACKAGE):
            text = f"{category.__name__}: {text} ({printable(str(filename))}:{lineno})"
        return f"{prog}: warning: {text}\n"

    warnings.formatwarning = formatwarning
    try:
        yield mode
    except stopped as error:
        if mode.debug:
            raise
        _report(prog, error, 1)
    except INPUT_ERRORS as error:
        if mode.debug:
            raise
        _report(prog, error, 2)
    finally:
        warnings.formatwarning = shown


def worker_message(message: str) -> str:
    """The original error's own message where ``message`` is a DataLoader worker's re-raised error ("Caught X in
    DataLoader worker process N. Original Traceback ...", ending with "X: <message>"); that last line where it
    is not "X: <message>" (a bare ``KeyError``); else ``message``."""
    if not (message.startswith("Caught ") and " in DataLoader worker process " in message):
        return message
    last = next((line for line in reversed(message.splitlines()) if line.strip()), message)
    kind, sep, rest = last.partition(": ")
    return rest if sep and kind.replace(".", "").replace("_", "").isalnum() else last


def _report(prog: str, error: BaseException, code: int):
    message = one_line(worker_message(str(error)) if str(error) else error)
    print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(code) from None
