"""Notice-to-committed and notice-to-exit latency of a preemption through the metadata server.

Each trial starts `spotrunner run --metadata on` against a local metadata stand-in
(spotrunner.drill.MetadataServer, reached through GCE_METADATA_HOST), lets it train, flips
`instance/preempted` to TRUE and measures, from the flip:

    notice_seen        the supervisor's `preemption_notice` line read on stdout
    committed          the trainer's `checkpoint_committed` line with reason preemption
    exit               the supervisor's exit (must be 75)

then resets the server; the next trial resumes the same run id. Once with a local store, once
with the fake-gcs-server emulator (STORAGE_EMULATOR_HOST). Times are stamped when this process
reads each line, so they include the pipe and are an upper bound on what the daemon did.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (BenchError, Run, cleanup, emit, gcs_emulator, metadata_drill,  # noqa: E402
                          parse_quick, run_args, summary)

TRAIN_BEFORE_FLIP = 0.5  # seconds of training between training_started and the flip
GOAL_MEDIAN, GOAL_MAX = 1.0, 3.0


def trials(store: str, count: int, server: Any, run_id: str = "notice") -> dict[str, Any]:
    """`count` preemption trials on one run in `store`; latencies in seconds."""
    args = run_args(store, run_id, synthetic_size=4000, epochs=100000, batch_size=128, checkpoint_interval=60,
                    metadata="on", seed=0)
    seen, committed, exited, persist, steps = [], [], [], [], []
    for trial in range(count):
        with cleanup() as runs:
            run = Run(args)
            runs.append(run)
            run.wait_event("training_started", timeout=120)
            run.run_for(TRAIN_BEFORE_FLIP)  # let it train and the watcher settle into its long-poll
            flipped = time.monotonic()
            server.preempt()
            notice = run.wait_event("preemption_notice", timeout=30)
            commit = run.wait_event("checkpoint_committed", timeout=30, reason="preemption")
            code = run.wait_exit(timeout=60)
            server.reset()
            if code != 75:
                raise BenchError(f"trial {trial}: exit {code}, expected 75:\n{run.output()}")
            seen.append(notice["_rx"] - flipped)
            committed.append(commit["_rx"] - flipped)
            exited.append(run.exited_mono - flipped)
            persist.append(float(commit.get("seconds", 0.0)))
            steps.append(commit.get("step"))
    result = {
        "trials": count,
        "notice_to_seen_s": summary(seen),
        "notice_to_committed_s": summary(committed),
        "notice_to_exit_s": summary(exited),
        "emergency_checkpoint_seconds": summary(persist),
        "last_step": steps[-1] if steps else None,
    }
    result["goal_met"] = bool(committed and exited
                              and result["notice_to_committed_s"]["median"] <= GOAL_MEDIAN
                              and result["notice_to_exit_s"]["median"] <= GOAL_MEDIAN
                              and result["notice_to_committed_s"]["max"] <= GOAL_MAX
                              and result["notice_to_exit_s"]["max"] <= GOAL_MAX)
    return result


def run(quick: bool = False) -> dict[str, Any]:
    """Latencies with a local store and with the GCS emulator (quick: 5 trials each, else 20)."""
    count = 5 if quick else 20
    result: dict[str, Any] = {"goal": f"median <= {GOAL_MEDIAN} s, max <= {GOAL_MAX} s (committed and exit)",
                              "model": "cifarnet", "batch_size": 128}
    with metadata_drill() as server:
        with tempfile.TemporaryDirectory(prefix="bench-notice-") as store:
            result["local"] = trials(store, count, server)
        with gcs_emulator() as bucket:
            result["gcs_emulator"] = trials(bucket, count, server)
    result["goal_met"] = result["local"]["goal_met"] and result["gcs_emulator"]["goal_met"]
    return result


if __name__ == "__main__":
    emit(run(quick=parse_quick()))
