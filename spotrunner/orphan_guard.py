"""Exec a command that dies with its parent: `python -m spotrunner.orphan_guard CMD ARGS...`.

torchrun does not ask the kernel to kill it when its parent dies, so a SIGKILLed supervisor
would leave it and its workers training on alone. PR_SET_PDEATHSIG survives exec.
"""

import ctypes
import os
import signal
import sys

if __name__ == "__main__":
    parent = os.getppid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise SystemExit(1)
    os.execvp(sys.argv[1], sys.argv[1:])
