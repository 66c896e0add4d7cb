"""The checkpoint manager in-process, on a real local store: what a stop costs after a commit."""

from __future__ import annotations

import time

import structlog
import torch

from spotrunner import history
from spotrunner.checkpoint.manager import CheckpointManager, Snapshot
from spotrunner.stores.local import LocalStore


def snapshot(step: int, reason: str) -> Snapshot:
    return Snapshot({"weights": torch.full((4,), float(step))}, step, 0, reason, time.monotonic(), 0.0)


def test_a_stop_at_an_already_committed_step_writes_nothing_and_reports_its_own_reason(tmp_path):
    store = LocalStore(str(tmp_path / "run"))
    heard = []  # what the supervisor is told, one Committed per save
    manager = CheckpointManager(store, interval=60, keep=2, writer={"host": "test"}, on_commit=heard.append)
    try:
        manager.save(snapshot(7, "periodic"))
        assert manager.wait_idle(timeout=30)
        assert manager.last_committed_step == 7
        objects_before = store.list()

        with structlog.testing.capture_logs() as logged:
            committed = manager.save_now(snapshot(7, "signal"), deadline=time.monotonic() + 10)
    finally:
        manager.close()

    assert committed is not None and committed.step == 7
    assert committed.record["reason"] == "periodic"  # the record written at step 7 stands
    assert store.list() == objects_before  # no second blob, no retry of the commit
    events = [e for e in logged if e["event"] == "checkpoint_committed"]
    assert len(events) == 1
    assert events[0]["reason"] == "signal" and events[0]["committed_as"] == "periodic"
    assert events[0]["step"] == 7 and events[0]["bytes"] == committed.record["size"]
    assert history.read_json(store, history.commit_key(7))["reason"] == "periodic"
    # The supervisor hears of the stop's checkpoint (report counts it as an emergency one).
    assert [c.record["reason"] for c in heard] == ["periodic", "signal"]
    assert heard[-1].record["committed_as"] == "periodic" and heard[-1].step == 7


def test_a_stop_after_new_steps_commits_a_new_checkpoint(tmp_path):
    store = LocalStore(str(tmp_path / "run"))
    manager = CheckpointManager(store, interval=60, keep=2, writer={"host": "test"})
    try:
        manager.save(snapshot(7, "periodic"))
        assert manager.wait_idle(timeout=30)
        committed = manager.save_now(snapshot(9, "signal"), deadline=time.monotonic() + 10)
    finally:
        manager.close()

    assert committed is not None and committed.step == 9 and committed.record["reason"] == "signal"
    assert history.read_json(store, history.commit_key(9))["reason"] == "signal"
