"""``python -m protokern.train``: see ``python -m protokern.train --help``.

Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption, ``kill``) stop a run the same orderly way, through one
handler: a stop that comes while a step's checkpoints are written waits for them, the half-done step goes to
interrupted.pt, the line printed says how to resume from last.pt, and the exit status is 128 + the signal (130,
143). A second Ctrl-C or SIGTERM kills at once. A job a shell started in the background with Ctrl-C ignored
(``cmd &`` in a script, nohup) keeps ignoring it, as Python does. Sent to the whole process group (a terminal's
Ctrl-C, SLURM, systemd), the signal stops the run the same way: its DataLoader workers leave it to this process
(protokern.data.loader.worker_init) and are shut down by the orderly stop.
"""

import os
import signal
import sys

from protokern.train.main import main
from protokern.utils import STOP_SIGNALS, stop

_received: list[int] = []
_main_pid = os.getpid()


def _worker_exited(signum, frame):
    """SIGCHLD after a stop signal: nothing to do (a no-op handler rather than SIG_DFL, so that a SIGCHLD already
    pending still finds a Python handler)."""


def _stop(signum, frame):
    if os.getpid() != _main_pid:  # a DataLoader worker just forked, before its worker_init: the stop is ours
        return
    _received.append(signum)
    for taken in STOP_SIGNALS:  # a second stop signal, of either kind, kills at once
        signal.signal(taken, signal.SIG_DFL)
    if hasattr(signal, "SIGCHLD"):  # a worker the signal still killed (mid-start) is no error to raise mid-save
        signal.signal(signal.SIGCHLD, _worker_exited)
    stop()  # KeyboardInterrupt, at once or once the batch being fetched is in


if __name__ == "__main__":
    STOP_SIGNALS.add(signal.SIGTERM)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # (a shell's background job: Ctrl-C stays ignored)
        STOP_SIGNALS.add(signal.SIGINT)  # (Python's own KeyboardInterrupt came in the middle of a save)
    for taken in STOP_SIGNALS:
        signal.signal(taken, _stop)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(128 + (_received[-1] if _received else signal.SIGINT))
