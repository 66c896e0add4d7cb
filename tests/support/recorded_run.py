"""A realistic recorded run with one preemption, written into a LocalStore with history.py's schema.

The numbers are round on purpose so tests can compute expectations by hand:

    T0 = 1_700_000_000, 5 steps/s, batch 128 (640 img/s), 391 steps an epoch, 30 epochs (11 730 steps)

    session "s1" (us-central1-a, n1-standard-4 + 1 x nvidia-tesla-t4, SPOT)
        started T0, trainer start T0+10 (resumed from 0), first step T0+40
        periodic checkpoints at steps 1500/3000/4500 (T0+340/640/940)
        preemption notice (metadata) at T0+1240 = step 6000; emergency commit 6000 at T0+1242
        ended T0+1250, end_reason preemption, exit 75
    VM down T0+1250 .. T0+1850 (600 s)
    session "s2" (same VM type and zone)
        started T0+1850, trainer start T0+1860 (resumed from 6000), first step T0+1885
        periodic checkpoints 7500/9000/10500 (T0+2185/2485/2785), final 11730 at T0+3031
        ended T0+3040, end_reason completed, exit 0 — unless `completed=False`: then s2 is still
        running (updated at T0+2500, last step 9075, no final.json).

Retention (keep 3 + the newest) deleted the commit records of steps 1500 and 3000; the sessions'
own `checkpoints` lists still hold every commit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spotrunner import history
from spotrunner.stores.local import LocalStore

T0 = 1_700_000_000.0
STEPS_PER_SECOND = 5
BATCH = 128
STEPS_PER_EPOCH = 391
EPOCHS = 30
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS  # 11730
CHECKPOINT_BYTES = 745_512
WEIGHTS_SHA256 = "9f" * 32
MACHINE_TYPE = "n1-standard-4"
ZONE = "us-central1-a"
GPUS = [{"type": "nvidia-tesla-t4", "count": 1}]
PERIODIC_SNAPSHOT_SECONDS = 0.2
DELETED_COMMIT_STEPS = (1500, 3000)


@dataclass
class RecordedRun:
    store: LocalStore
    run_id: str
    completed: bool
    now: float
    """A 'current time' for the run: a few seconds after its last record."""


def _step_at(t: float, first_step_at: float, start_step: int) -> int:
    return start_step + int(round((t - first_step_at) * STEPS_PER_SECOND))


def _metrics(first_step_at: float, start_step: int, end_step: int) -> list[dict[str, Any]]:
    rows = []
    for epoch in range(EPOCHS):
        step = STEPS_PER_EPOCH * (epoch + 1)
        if not start_step < step <= end_step:
            continue
        rows.append({
            "time": first_step_at + (step - start_step) / STEPS_PER_SECOND,
            "step": step,
            "epoch": epoch,
            "train_loss": round(0.4 + 1.9 * math.exp(-0.15 * epoch), 4),
            "test_loss": round(0.8 + 1.5 * math.exp(-0.12 * epoch), 4),
            "test_accuracy": round(0.72 - 0.55 * math.exp(-0.2 * epoch), 4),
        })
    return rows


def _throughput(first_step_at: float, start_step: int, until: float) -> list[dict[str, Any]]:
    rows = []
    t = first_step_at + 30
    while t <= until:
        rows.append({"time": t, "step": _step_at(t, first_step_at, start_step),
                     "img_per_s": float(STEPS_PER_SECOND * BATCH)})
        t += 30
    return rows


def _checkpoint(time: float, step: int, reason: str, seconds: float) -> dict[str, Any]:
    return {"time": time, "step": step, "reason": reason, "bytes": CHECKPOINT_BYTES, "seconds": seconds}


def _session(session_id: str, host: str, boot_id: str, started: float, trainer_start: float,
             first_step: float, resumed_from: int, **fields: Any) -> dict[str, Any]:
    record = {
        "format": history.FORMAT, "session_id": session_id, "run_id": "", "host": host, "boot_id": boot_id,
        "zone": ZONE, "machine_type": MACHINE_TYPE, "provisioning_model": "SPOT", "gpus": [dict(g) for g in GPUS],
        "started_at": started, "trainer_starts": [
            {"time": trainer_start, "resumed_from_step": resumed_from, "first_step_at": first_step}],
        "total_steps": TOTAL_STEPS, "lost_steps": 0, "notices": [],
    }
    record.update(fields)
    return record


def write_recorded_run(root: str, run_id: str = "cifar-spot", *, completed: bool = True) -> RecordedRun:
    """A LocalStore under `root`/`run_id` holding the run described in this module's docstring."""
    store = LocalStore(f"{root}/{run_id}")

    # Session 1: trains from step 0, gets a preemption notice at step 6000.
    s1_first = T0 + 40
    s1 = _session("s1", "spot-vm-1", "boot-a", T0, T0 + 10, s1_first, 0)
    s1_checkpoints = [
        _checkpoint(T0 + 340, 1500, "periodic", 0.9),
        _checkpoint(T0 + 640, 3000, "periodic", 0.9),
        _checkpoint(T0 + 940, 4500, "periodic", 0.9),
        _checkpoint(T0 + 1242, 6000, "preemption", 1.5),
    ]
    s1.update({
        "run_id": run_id, "updated_at": T0 + 1250, "ended_at": T0 + 1250, "state": "ended",
        "end_reason": "preemption", "exit_code": 75, "notices": [{"time": T0 + 1240, "source": "metadata"}],
        "last_step": 6000, "epoch": 6000 // STEPS_PER_EPOCH, "checkpoints": s1_checkpoints,
        "metrics": _metrics(s1_first, 0, 6000), "throughput": _throughput(s1_first, 0, T0 + 1240),
    })

    # Session 2: the VM came back after 600 s and resumed from the emergency checkpoint.
    s2_first = T0 + 1885
    s2 = _session("s2", "spot-vm-1", "boot-b", T0 + 1850, T0 + 1860, s2_first, 6000)
    s2_checkpoints = [
        _checkpoint(T0 + 2185, 7500, "periodic", 0.9),
        _checkpoint(T0 + 2485, 9000, "periodic", 0.9),
    ]
    if completed:
        s2_checkpoints += [
            _checkpoint(T0 + 2785, 10500, "periodic", 0.9),
            _checkpoint(T0 + 3033, TOTAL_STEPS, "final", 0.7),
        ]
        s2.update({
            "updated_at": T0 + 3040, "ended_at": T0 + 3040, "state": "ended", "end_reason": "completed",
            "exit_code": 0, "last_step": TOTAL_STEPS, "epoch": EPOCHS - 1,
            "metrics": _metrics(s2_first, 6000, TOTAL_STEPS),
            "throughput": _throughput(s2_first, 6000, T0 + 3031),
        })
        now = T0 + 3100
    else:
        s2.update({
            "updated_at": T0 + 2500, "ended_at": None, "state": "running", "end_reason": None,
            "exit_code": None, "last_step": 9075, "epoch": 9075 // STEPS_PER_EPOCH,
            "metrics": _metrics(s2_first, 6000, 9075), "throughput": _throughput(s2_first, 6000, T0 + 2500),
        })
        now = T0 + 2505
    s2.update({"run_id": run_id, "checkpoints": s2_checkpoints})

    store.put(history.session_key("s1"), history.encode(s1))
    store.put(history.session_key("s2"), history.encode(s2))

    for session, checkpoints in (("s1", s1_checkpoints), ("s2", s2_checkpoints)):
        for entry in checkpoints:
            step = entry["step"]
            nonce = f"{step:06x}"
            blob = history.blob_key(step, nonce)
            store.create(blob, b"\0" * 64)  # a stand-in: status and report never open blobs
            if step in DELETED_COMMIT_STEPS:
                store.delete(blob)
                continue
            emergency = entry["reason"] in ("preemption", "signal")
            record = {
                "format": history.FORMAT, "step": step, "epoch": step // STEPS_PER_EPOCH, "blob": blob,
                "sha256": "00" * 32, "size": CHECKPOINT_BYTES, "reason": entry["reason"], "time": entry["time"],
                "snapshot_seconds": PERIODIC_SNAPSHOT_SECONDS,
                "persist_seconds": 1.3 if emergency else 0.7,
                "writer": {"host": "spot-vm-1", "pid": 4242, "session_id": session}, "world_size": 1,
            }
            store.create(history.commit_key(step), history.encode(record))

    if completed:
        final_metrics = s2["metrics"][-1]
        store.create(history.FINAL_KEY, history.encode({
            "step": TOTAL_STEPS, "epoch": EPOCHS - 1, "weights_sha256": WEIGHTS_SHA256, "time": T0 + 3034,
            "metrics": final_metrics, "checkpoint": history.commit_key(TOTAL_STEPS),
        }))
    return RecordedRun(store=store, run_id=run_id, completed=completed, now=now)
