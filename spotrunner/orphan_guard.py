"""Processes that die with their parent, so a SIGKILLed supervisor leaves no orphan.

`die_with_parent(parent)` asks the kernel for SIGKILL when the parent dies (the trainer
calls it at start). As a script, `python -m spotrunner.orphan_guard CMD ARGS...` does the
same and execs CMD: torchrun does not ask for it itself, and PR_SET_PDEATHSIG survives exec.
"""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Arrange SIGKILL on the death of `parent`; False if it is already gone (or prctl is missing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return True  # not Linux' libc: nothing to arrange, nothing to refuse
    return os.getppid() == parent  # the parent may have died before prctl took effect


if __name__ == "__main__":
    if not die_with_parent(os.getppid()):
        raise SystemExit(1)
    os.execvp(sys.argv[1], sys.argv[1:])
