"""The supervisor end to end: real processes, real signals, a real local metadata server."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from spotrunner import exitcodes
from tests.support.processes import group_is_empty, wait_for
from tests.support.runs import run_args

pytestmark = pytest.mark.slow


def finish(start, store: str, *extra: str, metadata: str = "off") -> tuple[dict, object]:
    proc = start(run_args(store, *extra, metadata=metadata))
    assert proc.wait_exit(timeout=180) == exitcodes.OK, proc.output()
    return proc.wait_event("training_completed"), proc


def test_metadata_preemption_stops_within_deadline_and_resumes_exactly(spotrunner_proc, tmp_path, metadata_server,
                                                                      reference_digest):
    store = str(tmp_path)
    proc = spotrunner_proc(run_args(store, "--stop-deadline", "10", interval="1000", metadata="on"))
    proc.wait_event("training_started")
    time.sleep(1.0)  # let it train a little; the step assertion below checks it did
    flipped = time.monotonic()
    metadata_server.preempt()
    code = proc.wait_exit(timeout=30)
    elapsed = time.monotonic() - flipped
    assert code == exitcodes.STOPPED, proc.output()
    assert elapsed < 10, f"took {elapsed:.1f} s, more than --stop-deadline"
    notices = proc.find("preemption_notice")
    assert [n["source"] for n in notices] == ["metadata"]
    committed = proc.find("checkpoint_committed", reason="preemption")
    assert len(committed) == 1 and committed[0]["step"] > 0
    assert group_is_empty(proc.pid), "the stopped run left processes behind"

    metadata_server.reset()
    completed, again = finish(spotrunner_proc, store, metadata="on")
    assert again.wait_event("training_started")["step"] == committed[0]["step"]  # zero steps lost
    assert completed["weights_sha256"] == reference_digest


def test_503_storms_and_slow_answers_do_not_stop_the_run(spotrunner_proc, tmp_path, metadata_server):
    proc = spotrunner_proc(run_args(str(tmp_path), metadata="on"))
    proc.wait_event("training_started")
    metadata_server.fail_next(40, status=503)
    wait_for(lambda: metadata_server.faults.get("fail_next", 0) == 0 or proc.proc.poll() is not None, 60,
             "the 503 storm to be served")
    metadata_server.fail_next(10, status=429)
    metadata_server.set_delay(2.0)
    assert proc.wait_exit(timeout=180) == exitcodes.OK, proc.output()
    assert not proc.find("preemption_notice")
    assert proc.find("notice_source_failed"), "the storm never reached the watcher"


def test_trainer_killed_by_someone_else_is_restarted_and_finishes_exactly(spotrunner_proc, tmp_path,
                                                                         reference_digest):
    proc = spotrunner_proc(run_args(str(tmp_path), "--max-restarts", "3"))
    worker = proc.wait_event("worker_started")
    proc.wait_event("training_started")
    time.sleep(0.5)  # mid-run
    os.kill(worker["pid"], signal.SIGKILL)
    assert proc.wait_exit(timeout=180) == exitcodes.OK, proc.output()
    assert proc.find("worker_exited", code=-signal.SIGKILL)
    assert proc.find("worker_restart_scheduled")
    assert len(proc.find("worker_started")) == 2
    assert proc.wait_event("training_completed")["weights_sha256"] == reference_digest


def test_hung_trainer_is_detected_and_restarted(spotrunner_proc, tmp_path, reference_digest):
    proc = spotrunner_proc(run_args(str(tmp_path), "--hang-timeout", "2"))
    worker = proc.wait_event("worker_started")
    proc.wait_event("training_started")
    os.kill(worker["pid"], signal.SIGSTOP)  # alive but making no progress
    proc.wait_event("worker_hung", timeout=30)
    assert proc.wait_exit(timeout=180) == exitcodes.OK, proc.output()
    assert len(proc.find("worker_started")) == 2
    assert proc.wait_event("training_completed")["weights_sha256"] == reference_digest


def test_restarts_are_bounded(spotrunner_proc, tmp_path):
    proc = spotrunner_proc(run_args(str(tmp_path), "--max-restarts", "1"))
    for attempt in range(2):
        wait_for(lambda: len(proc.find("training_started")) > attempt, 60, f"trainer start {attempt + 1}")
        pid = proc.find("worker_started")[attempt]["pid"]
        os.kill(pid, signal.SIGKILL)
    assert proc.wait_exit(timeout=60) == exitcodes.FAILURE
    failed = proc.wait_event("worker_failed_permanently")
    assert failed["severity"] == "ERROR" and "hint" in failed


def test_configuration_error_in_the_trainer_is_not_retried(spotrunner_proc, tmp_path):
    store = str(tmp_path)
    first = spotrunner_proc(run_args(store, interval="1000"))
    first.wait_event("training_started")
    first.signal(signal.SIGTERM)
    assert first.wait_exit(timeout=30) == exitcodes.STOPPED
    changed = spotrunner_proc(run_args(store, "--lr", "0.5"))  # the run's checkpoints say otherwise
    assert changed.wait_exit(timeout=60) == exitcodes.CONFIG, changed.output()
    error = changed.wait_event("config_error")
    assert "--lr=0.5 differs from the run's checkpoints" in error["error"]
    assert len(changed.find("worker_started")) == 1


def test_long_notice_checkpoints_at_once_and_trains_on_until_the_last_safe_moment(spotrunner_proc, tmp_path,
                                                                                 metadata_server):
    proc = spotrunner_proc(run_args(str(tmp_path), "--epochs", "20", "--stop-deadline", "4",
                                    "--preemption-notice-seconds", "12", interval="1000", metadata="on"))
    proc.wait_event("training_started")
    flipped = time.monotonic()
    metadata_server.preempt()
    early = proc.wait_event("checkpoint_committed", timeout=10, reason="preemption")
    assert early["_received"] - flipped < 3
    code = proc.wait_exit(timeout=30)
    elapsed = time.monotonic() - flipped
    assert code == exitcodes.STOPPED, proc.output()
    # It trained on for the usable part of the notice (12 - 4 - 2 s), then stopped in time.
    assert 5 < elapsed < 12, f"stopped after {elapsed:.1f} s"
    final = proc.find("checkpoint_committed", reason="preemption")
    assert len(final) == 2 and final[1]["step"] > early["step"]
    assert len(proc.find("preemption_notice")) == 1


def test_sd_notify_ready_status_watchdog_and_stopping(spotrunner_proc, tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    received: list[str] = []

    def messages() -> str:
        try:
            while True:
                received.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        return "\n".join(received)

    proc = spotrunner_proc(run_args(str(tmp_path / "store"), "--epochs", "20", interval="1000"),
                           env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000",
                                "WATCHDOG_PID": ""})
    wait_for(lambda: "READY=1" in messages(), 60, "READY=1")
    wait_for(lambda: "STATUS=epoch" in messages(), 30, "a STATUS= line")
    wait_for(lambda: "WATCHDOG=1" in messages(), 10, "WATCHDOG=1")
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(timeout=30) == exitcodes.STOPPED
    wait_for(lambda: "STOPPING=1" in messages(), 5, "STOPPING=1")
    status = next(m for m in received if m.startswith("STATUS=epoch"))
    assert "step" in status and "loss" in status
    sock.close()
