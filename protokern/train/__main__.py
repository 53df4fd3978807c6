"""``python -m protokern.train``: see ``python -m protokern.train --help``.

Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption, ``kill``) stop a run the same orderly way: the
half-done step goes to interrupted.pt, the line printed says how to resume from last.pt, and the exit status
is 128 + the signal (130, 143). A second SIGTERM kills at once.
"""

import signal
import sys

from protokern.train.main import main

_received: list[int] = []


def _stop(signum, frame):
    _received.append(signum)
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(128 + (_received[-1] if _received else signal.SIGINT))
