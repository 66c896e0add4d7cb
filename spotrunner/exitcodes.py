"""Exit codes shared by the supervisor and the trainer (DESIGN.md fixes 0, 75 and 78)."""

OK = 0
"""Training completed; the final model is in the store."""

FAILURE = 1
"""Something failed; the log line before exit says what and what to do."""

FENCED = 73
"""Another writer holds the run (a stale VM, a duplicate job). Not retried by systemd."""

STOPPED = 75
"""Stopped on a preemption notice or a signal, after committing a checkpoint (EX_TEMPFAIL)."""

CONFIG = 78
"""Configuration error; systemd must not restart-loop on it (EX_CONFIG)."""

ABORTED = 130
"""Aborted at once by a second SIGINT; no checkpoint was committed for this stop."""

# Exits the supervisor passes through unchanged instead of restarting the trainer.
NOT_RETRIED = frozenset({OK, FENCED, CONFIG})
