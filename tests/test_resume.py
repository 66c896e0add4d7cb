"""Exact resume on a local store: a run interrupted any way, any number of times, ends bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from spotrunner import exitcodes, history
from spotrunner.stores.local import LocalStore
from tests.support import runs
from tests.support.processes import group_is_empty, wait_for

pytestmark = pytest.mark.slow


def run_args(store: str, *extra: str, interval: str = "0.2") -> list[str]:
    return runs.run_args(store, *extra, interval=interval)


def run_to_completion(start, store: str, *extra: str) -> tuple[dict, object]:
    proc = start(run_args(store, *extra))
    code = proc.wait_exit(timeout=180)
    assert code == exitcodes.OK, proc.output()
    return proc.wait_event("training_completed"), proc


def uncommitted_blob(store_root: str) -> bool:
    """True while a persist is in progress: a blob (or temp file) exists without its commit record."""
    folder = os.path.join(store_root, "exact", "checkpoints")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return False
    commits = {name.split(".")[0] for name in names if name.endswith(history.COMMIT_SUFFIX)}
    return any(name.startswith(".tmp-") or (name.endswith(".pt") and name.split("-")[0] not in commits)
               for name in names)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_resumes_exactly(spotrunner_proc, tmp_path, reference_digest, seed):
    rng = random.Random(seed)
    store = str(tmp_path)
    run_store = LocalStore(os.path.join(store, "exact"))
    resumed_steps = []
    for attempt in range(3):
        if history.read_final(run_store) is not None:
            break  # the last kill landed just after the run completed
        proc = spotrunner_proc(run_args(store))
        started = proc.wait_event("training_started", timeout=60)
        resumed_steps.append(started["step"])
        if attempt == seed % 3:
            # Kill in the middle of a persist: a blob is being written, its commit record is not.
            wait_for(lambda: uncommitted_blob(store) or proc.proc.poll() is not None, 30, "a persist in flight",
                     interval=0.001)
        else:
            time.sleep(rng.uniform(0.2, 1.5))  # a random instant, not a synchronisation
        proc.kill_group()
        if proc.proc.returncode == exitcodes.OK:
            break  # it completed before this kill; its digest must match all the same
        assert proc.proc.returncode == -signal.SIGKILL
        wait_for(lambda: group_is_empty(proc.pid), 10, "the killed run's processes to be gone")
    if history.read_final(run_store) is None:
        _completed, finished = run_to_completion(spotrunner_proc, store)
        resumed_steps.append(finished.wait_event("training_started")["step"])
    assert history.read_final(run_store)["weights_sha256"] == reference_digest
    assert any(step > 0 for step in resumed_steps[1:]), \
        "no restart resumed mid-run; the kills came too early to test anything"


def test_sigterm_commits_and_exits_75_then_resumes_with_no_lost_steps(spotrunner_proc, tmp_path, reference_digest):
    store = str(tmp_path)
    proc = spotrunner_proc(run_args(store, interval="1000"))
    proc.wait_event("training_started")
    time.sleep(1.0)  # let it train a little; the assertion on stop_step below checks it did
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(timeout=30) == exitcodes.STOPPED, proc.output()
    committed = proc.find("checkpoint_committed", reason="signal")
    assert len(committed) == 1, proc.output()
    assert proc.find("preemption_notice", source="sigterm")
    assert proc.find("worker_exited", code=exitcodes.STOPPED)
    stop_step = committed[0]["step"]
    assert stop_step > 0
    record = json.loads(LocalStore(os.path.join(store, "exact")).read(history.commit_key(stop_step)))
    assert record["reason"] == "signal"

    completed, again = run_to_completion(spotrunner_proc, store)
    assert again.wait_event("training_started")["step"] == stop_step  # zero steps lost
    assert completed["weights_sha256"] == reference_digest


@pytest.mark.parametrize("damage", ["corrupt", "torn"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(spotrunner_proc, tmp_path, reference_digest,
                                                                   damage):
    store = str(tmp_path)
    proc = spotrunner_proc(run_args(store, interval="0.3"))
    proc.wait_event("training_started")
    wait_for(lambda: len(proc.find("checkpoint_committed")) >= 3, 60, "three committed checkpoints")
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(timeout=30) == exitcodes.STOPPED
    run_store = LocalStore(os.path.join(store, "exact"))
    commits = history.read_commits(run_store)
    newest, previous = commits[-1], commits[-2]
    path = os.path.join(run_store.root, *newest["blob"].split("/"))
    with open(path, "r+b") as handle:
        if damage == "corrupt":
            handle.seek(newest["size"] // 2)
            handle.write(b"\xde\xad\xbe\xef")
        else:
            handle.truncate(newest["size"] // 3)

    completed, again = run_to_completion(spotrunner_proc, store)
    corrupt = again.wait_event("checkpoint_corrupt")
    assert corrupt["severity"] == "ERROR" and corrupt["step"] == newest["step"]
    assert again.wait_event("training_started")["step"] == previous["step"]
    assert completed["weights_sha256"] == reference_digest


def test_rerunning_a_completed_run_says_so_and_exits_0(spotrunner_proc, tmp_path, reference_digest):
    store = str(tmp_path)
    run_to_completion(spotrunner_proc, store)
    again = spotrunner_proc(run_args(store))
    assert again.wait_exit(timeout=60) == exitcodes.OK
    done = again.wait_event("run_already_completed")
    assert done["weights_sha256"] == reference_digest
    assert not again.find("training_started") and not again.find("worker_started")


def test_second_sigint_aborts_at_once(spotrunner_proc, tmp_path):
    proc = spotrunner_proc(run_args(str(tmp_path), "--stop-deadline", "60", interval="1000"))
    proc.wait_event("training_started")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    wait_for(lambda: proc.find("preemption_notice", source="sigint"), 10, "the first SIGINT to be handled")
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait_exit(timeout=15)
    assert code in (exitcodes.STOPPED, exitcodes.ABORTED), proc.output()
    wait_for(lambda: group_is_empty(proc.pid), 10, "no process left behind")
