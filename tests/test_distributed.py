"""torchrun on CPU (gloo, 2 processes): a notice stops every rank at the same step, one commit, exact resume."""

from __future__ import annotations

import os
import signal
import time

import pytest

from spotrunner import exitcodes
from tests.support.processes import SpotrunnerProcess, group_is_empty, wait_for
from tests.support.runs import run_args

pytestmark = pytest.mark.slow

TWO = ("--nproc-per-node", "2", "--master-port", "29517")


@pytest.fixture(scope="module")
def two_process_digest(tmp_path_factory) -> str:
    """weights_sha256 of the 2-process run never interrupted."""
    proc = SpotrunnerProcess(run_args(str(tmp_path_factory.mktemp("ddp-reference")), *TWO))
    try:
        assert proc.wait_exit(timeout=240) == exitcodes.OK, proc.output()
        return proc.wait_event("training_completed")["weights_sha256"]
    finally:
        proc.kill_group()


def rank_of(event: dict) -> str:
    return event["logging.googleapis.com/labels"].get("rank", "0")


def test_notice_stops_both_ranks_at_one_step_and_resume_matches(spotrunner_proc, tmp_path, metadata_server,
                                                                two_process_digest):
    store = str(tmp_path)
    proc = spotrunner_proc(run_args(store, *TWO, "--stop-deadline", "15", interval="1000", metadata="on"))
    wait_for(lambda: len(proc.find("training_started")) == 2 or proc.proc.poll() is not None, 120,
             "both ranks to start training")
    time.sleep(1.0)  # mid-run
    metadata_server.preempt()
    assert proc.wait_exit(timeout=60) == exitcodes.STOPPED, proc.output()
    stopped = proc.find("training_stopped")
    assert sorted(rank_of(e) for e in stopped) == ["0", "1"], proc.output()
    assert len({e["step"] for e in stopped}) == 1, f"ranks stopped at different steps: {stopped}"
    committed = proc.find("checkpoint_committed")
    assert len(committed) == 1 and committed[0]["reason"] == "preemption"
    assert committed[0]["step"] == stopped[0]["step"] > 0
    assert group_is_empty(proc.pid), "torchrun or a rank was left behind"

    metadata_server.reset()
    resumed = spotrunner_proc(run_args(store, *TWO, metadata="on"))
    assert resumed.wait_exit(timeout=240) == exitcodes.OK, resumed.output()
    assert {e["step"] for e in resumed.find("training_started")} == {committed[0]["step"]}
    assert resumed.wait_event("training_completed")["weights_sha256"] == two_process_digest


def test_a_stop_reaching_one_rank_stops_all_ranks(spotrunner_proc, tmp_path):
    """A notice on one node only: that rank's flag is combined with the others' every step."""
    proc = spotrunner_proc(run_args(str(tmp_path), *TWO, interval="1000"))
    wait_for(lambda: len(proc.find("training_started")) == 2, 120, "both ranks to start training")
    # The rank-1 process: a child of torchrun, which is the supervisor's child.
    rank1 = next(e for e in proc.find("training_started") if rank_of(e) == "1")
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    workers = [pid for pid in pids if _is_rank(pid, "1")]
    assert workers, f"no rank-1 process found for {rank1}"
    os.kill(workers[0], signal.SIGTERM)
    assert proc.wait_exit(timeout=60) == exitcodes.STOPPED, proc.output()
    stopped = proc.find("training_stopped")
    assert len(stopped) == 2 and len({e["step"] for e in stopped}) == 1
    assert len(proc.find("checkpoint_committed", reason="signal")) == 1


def test_resume_with_another_world_size_continues_from_the_same_sample(spotrunner_proc, tmp_path):
    store = str(tmp_path)
    first = spotrunner_proc(run_args(store, *TWO, interval="1000"))
    wait_for(lambda: len(first.find("training_started")) == 2, 120, "both ranks to start training")
    time.sleep(0.5)
    first.signal(signal.SIGTERM)
    assert first.wait_exit(timeout=60) == exitcodes.STOPPED, first.output()
    single = spotrunner_proc(run_args(store))
    assert single.wait_exit(timeout=180) == exitcodes.OK, single.output()
    changed = single.wait_event("world_size_changed")
    assert changed["saved"] == 2 and changed["now"] == 1


def _is_rank(pid: int, rank: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
    except OSError:
        return False
    return f"RANK={rank}".encode() in environ and b"_SPOTRUNNER_CONFIG=" in b"\0".join(environ)
