"""torchrun (``torch.distributed.run``) as the demo starts it: a signal that stops it (the demo
passes a Ctrl-C on as SIGTERM) ends it with status 128 + the signal, as a process killed by it
would, and without the traceback of torchrun's ``SignalException``, which read as a crash after
the ranks had stopped cleanly (each checkpointing the step it was in)."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def run() -> int:
    """torchrun's ``main()`` on ``sys.argv[1:]``; its exit status."""
    try:
        main()
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run())
