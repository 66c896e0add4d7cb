"""The checkpoint manager in-process, on a real local store: stops after a commit, damaged checkpoints."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
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


@pytest.mark.parametrize("damage", ["corrupt", "torn"])
def test_a_damaged_checkpoint_is_set_aside_so_the_replay_can_commit_its_step_again(tmp_path, damage):
    store = LocalStore(str(tmp_path / "run"))
    writer = CheckpointManager(store, interval=60, keep=3, writer={"host": "test"})
    for step in (5, 7):
        writer.save_now(snapshot(step, "periodic"), deadline=time.monotonic() + 10)
    writer.close()
    newest = history.read_json(store, history.commit_key(7))
    blob = tmp_path / "run" / newest["blob"]
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 3] if damage == "torn" else data[:-8] + b"\xde\xad\xbe\xef" * 2)

    manager = CheckpointManager(store, interval=60, keep=3, writer={"host": "test"})
    try:
        with structlog.testing.capture_logs() as logged:
            state, record = manager.restore()
        assert record["step"] == 5 and float(state["weights"][0]) == 5.0
        assert [e["step"] for e in logged if e["event"] == "checkpoint_corrupt"] == [7]
        aside = history.read_set_aside(store)
        assert [r["step"] for r in aside] == [7] and aside[0]["blob"] == newest["blob"] and aside[0]["error"]

        # The replay reaches step 7 again and stops there: a fresh, good commit of step 7.
        committed = manager.save_now(snapshot(7, "signal"), deadline=time.monotonic() + 10)
    finally:
        manager.close()
    assert committed is not None and committed.record["reason"] == "signal"
    assert committed.record["blob"] != newest["blob"]

    again = CheckpointManager(store, interval=60, keep=3, writer={"host": "test"})
    try:
        state, record = again.restore()
    finally:
        again.close()
    assert record["step"] == 7 and record["reason"] == "signal" and float(state["weights"][0]) == 7.0


def test_retention_removes_set_aside_records_older_than_the_kept_checkpoints(tmp_path):
    store = LocalStore(str(tmp_path / "run"))
    manager = CheckpointManager(store, interval=60, keep=2, writer={"host": "test"})
    try:
        manager.save_now(snapshot(3, "periodic"), deadline=time.monotonic() + 10)
        store.put(history.set_aside_key(3), history.encode({"step": 3, "error": "test"}))
        manager.save_now(snapshot(4, "periodic"), deadline=time.monotonic() + 10)
        assert [r["step"] for r in history.read_set_aside(store)] == [3]  # still within the newest 2
        manager.save_now(snapshot(6, "periodic"), deadline=time.monotonic() + 10)
    finally:
        manager.close()
    assert history.read_set_aside(store) == []
    assert [r["step"] for r in history.read_commits(store)] == [4, 6]


def test_checkpoints_command_lists_verifies_and_shows_what_was_set_aside(tmp_path):
    store = LocalStore(str(tmp_path / "runs" / "listed"))
    manager = CheckpointManager(store, interval=60, keep=3, writer={"host": "test"})
    try:
        for step in (2, 4):
            manager.save_now(snapshot(step, "periodic"), deadline=time.monotonic() + 10)
    finally:
        manager.close()
    store.put(history.set_aside_key(3), history.encode({"step": 3, "error": "sha256 mismatch (test)"}))

    def checkpoints_verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spotrunner", "checkpoints", "--store", str(tmp_path / "runs"),
                               "--run-id", "listed", "--verify"], capture_output=True, text=True, timeout=120)

    listed = checkpoints_verify()
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "step 3: set aside as corrupt by a restore: sha256 mismatch (test)"
    assert [line.split()[0] for line in lines[2:]] == ["2", "4"] and all(line.endswith("ok") for line in lines[2:])

    blob = tmp_path / "runs" / "listed" / history.read_json(store, history.commit_key(4))["blob"]
    blob.write_bytes(blob.read_bytes()[:100])
    damaged = checkpoints_verify()
    assert damaged.returncode == 1, damaged.stderr
    newest = damaged.stdout.splitlines()[-1]
    assert newest.split()[0] == "4" and "CORRUPT" in newest and "torn" in newest
