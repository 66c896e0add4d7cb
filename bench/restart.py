"""Restart-to-first-step: how long a restarted `spotrunner run` takes to train again after a checkpoint.

A first run trains and is stopped with SIGTERM (exit 75, checkpoint committed). Each trial then
starts `spotrunner run` on the same run id (local store), lets it resume and train, and stops it
the same way. The first training step's time comes from the session record the supervisor
writes (`sessions/<id>.json`, trainer_starts[].first_step_at, reported by the trainer over the
status socket); the process start is this process's clock at Popen, worker_started is the
supervisor's log time. All are unix times on this one machine.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import BenchError, Run, cleanup, emit, iso_to_unix, parse_quick, run_args, summary  # noqa: E402

RUN_ID = "restart"


def _train_then_stop(args: list[str], seconds: float) -> Run:
    """One session: start, train `seconds` after training_started, SIGTERM, expect exit 75."""
    with cleanup() as runs:
        run = Run(args)
        runs.append(run)
        run.wait_event("training_started", timeout=120)
        run.run_for(seconds)
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait_exit(timeout=60)
        if code != 75:
            raise BenchError(f"expected exit 75 after SIGTERM, got {code}:\n{run.output()}")
    return run


def run(quick: bool = False) -> dict[str, Any]:
    """Spawn->first step and worker_started->first step over several resumes (quick: 3, else 6)."""
    from spotrunner import history
    from spotrunner.stores import open_store

    count = 3 if quick else 6
    spawn_first, worker_first, spawn_started, started_first, resumed_steps = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as store_dir:
        args = run_args(store_dir, RUN_ID, synthetic_size=4000, epochs=100000, batch_size=128,
                        checkpoint_interval=60, metadata="off", seed=0)
        _train_then_stop(args, 1.0)  # the checkpoint every trial resumes from
        store = open_store(store_dir, RUN_ID)
        for trial in range(count):
            run = _train_then_stop(args, 0.5)
            sessions = [s for s in history.read_sessions(store) if s.get("pid") == run.pid]
            starts = sessions[-1].get("trainer_starts") if sessions else None
            if not starts or starts[-1].get("first_step_at") is None:
                raise BenchError(f"trial {trial}: no first_step_at in the session record {sessions}")
            start = starts[-1]
            if start.get("resumed_from_step") in (None, 0):
                raise BenchError(f"trial {trial}: the run did not resume from a checkpoint: {start}")
            first = float(start["first_step_at"])
            worker = iso_to_unix(run.find("worker_started")[0]["time"])
            started = run.find("training_started")[0]
            spawn_first.append(first - run.spawned_unix)
            worker_first.append(first - worker)
            spawn_started.append(started["_rx"] - run.spawned_mono)
            started_first.append(first - float(start["time"]))
            resumed_steps.append(start["resumed_from_step"])
    return {
        "store": "local", "trials": count, "dataset": "synthetic, 4,000 images", "resumed_from_steps": resumed_steps,
        "spawn_to_first_step_s": summary(spawn_first),
        "worker_started_to_first_step_s": summary(worker_first),
        "spawn_to_training_started_s": summary(spawn_started),
        "training_started_to_first_step_s": summary(started_first),
        "note": "worker_started is logged with millisecond resolution; first_step_at is the trainer's clock",
    }


if __name__ == "__main__":
    emit(run(quick=parse_quick()))
