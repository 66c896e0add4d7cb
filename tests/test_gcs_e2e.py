"""End to end on a gs:// store (the fake-gcs-server emulator, a fault proxy in front where it matters).

The GCS counterpart of test_resume.py: the same small run (2000 synthetic images, 3 epochs,
batch 32, one thread) must end with the weights of the same run never interrupted, whatever
happens to the process or to the bucket: SIGKILL while an upload is in flight, a corrupt
newest checkpoint, a second writer, a store that is down for 30 s, a store too slow for the
emergency checkpoint (spilled locally, uploaded on the next start).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from urllib.parse import quote

import pytest
import requests

from spotrunner import exitcodes, history
from tests.support.processes import SpotrunnerProcess, group_is_empty, wait_for

pytestmark = pytest.mark.slow

RUN_ID = "exact"
RUN = ["run", "--dataset", "synthetic", "--synthetic-size", "2000", "--batch-size", "32",
       "--metadata", "off", "--threads", "1", "--seed", "7", "--run-id", RUN_ID, "--log-format", "json"]
SMALL = ["--epochs", "3"]
# The store-down test needs training that outlasts a 30 s outage; only it pays for this size.
LONG = ["--epochs", "30"]
LONG_STEPS = 63 * 30


def run_args(store: str, *extra: str, interval: str = "0.2", size: list[str] = SMALL) -> list[str]:
    return [*RUN, *size, "--store", store, "--checkpoint-interval", interval, *extra]


def emulator_env(gcs_emulator) -> dict[str, str]:
    """Environment for a process that talks to the emulator directly, bypassing the fault proxy."""
    return {"STORAGE_EMULATOR_HOST": gcs_emulator.endpoint, "GOOGLE_CLOUD_PROJECT": "spotrunner-test"}


def fresh_bucket(gcs_emulator) -> str:
    name = f"e2e-{random.getrandbits(48):012x}"
    return gcs_emulator.create_bucket(name)


def reference_run(gcs_emulator, size: list[str]) -> SpotrunnerProcess:
    """An uninterrupted run on a fresh bucket of the emulator (no proxy); the caller waits for it."""
    return SpotrunnerProcess(run_args(fresh_bucket(gcs_emulator), size=size), env=emulator_env(gcs_emulator))


def completed_digest(proc: SpotrunnerProcess, timeout: float = 180) -> str:
    code = proc.wait_exit(timeout=timeout)
    assert code == exitcodes.OK, proc.output()
    return proc.wait_event("training_completed")["weights_sha256"]


@pytest.fixture(scope="module")
def reference_digest(gcs_emulator):
    """weights_sha256 of the small run never interrupted, on the emulator store."""
    proc = reference_run(gcs_emulator, SMALL)
    try:
        return completed_digest(proc)
    finally:
        proc.kill_group()


# --- looking into the bucket behind spotrunner's back (straight to the emulator) -----------


def bucket_name(url: str) -> str:
    return url[len("gs://"):].split("/", 1)[0]


def list_objects(gcs_emulator, bucket_url: str, prefix: str) -> list[str]:
    """Names of the objects under `prefix` (relative to the run root), read from the emulator directly."""
    root = f"{RUN_ID}/"
    names, token = [], None
    for _page in range(100):  # bounded: a run holds a few dozen objects
        params = {"prefix": root + prefix, **({"pageToken": token} if token else {})}
        response = requests.get(f"{gcs_emulator.endpoint}/storage/v1/b/{bucket_name(bucket_url)}/o",
                                params=params, timeout=10)
        response.raise_for_status()
        body = response.json()
        names += [item["name"][len(root):] for item in body.get("items", [])]
        token = body.get("nextPageToken")
        if not token:
            break
    return sorted(names)


def read_object(gcs_emulator, bucket_url: str, key: str) -> bytes:
    name = quote(f"{RUN_ID}/{key}", safe="")
    response = requests.get(f"{gcs_emulator.endpoint}/storage/v1/b/{bucket_name(bucket_url)}/o/{name}",
                            params={"alt": "media"}, timeout=30)
    response.raise_for_status()
    return response.content


def commits(gcs_emulator, bucket_url: str) -> list[dict]:
    """Commit records in the bucket, oldest step first."""
    keys = [k for k in list_objects(gcs_emulator, bucket_url, history.CHECKPOINTS_PREFIX)
            if k.endswith(history.COMMIT_SUFFIX)]
    return sorted((json.loads(read_object(gcs_emulator, bucket_url, k)) for k in keys), key=lambda r: r["step"])


def uncommitted_blob_steps(gcs_emulator, bucket_url: str) -> set[int]:
    """Steps of checkpoint blobs in the bucket that have no commit record (an upload not finished)."""
    keys = list_objects(gcs_emulator, bucket_url, history.CHECKPOINTS_PREFIX)
    committed = {int(k.rsplit("/", 1)[1].split(".")[0]) for k in keys if k.endswith(history.COMMIT_SUFFIX)}
    blobs = {int(k.rsplit("/", 1)[1].split("-")[0]) for k in keys if k.endswith(".pt")}
    return blobs - committed


def held_uploads(proxy) -> int:
    """Upload requests the proxy has received but not yet answered (held by a delay)."""
    received = proxy.counts["POST"] + proxy.counts["PUT"]
    answered = sum(1 for method, _path, _outcome in list(proxy.log) if method in ("POST", "PUT"))
    return received - answered


def kill(proc: SpotrunnerProcess) -> None:
    proc.kill_group()
    assert proc.proc.returncode == -signal.SIGKILL, proc.output()
    wait_for(lambda: group_is_empty(proc.pid), 10, "the killed run's processes to be gone")


# --- the tests --------------------------------------------------------------------------


def test_sigkill_during_an_upload_and_at_a_random_moment_resumes_exactly(
        spotrunner_proc, fault_proxy, gcs_emulator, reference_digest):
    bucket = fault_proxy.bucket_url
    rng = random.Random(3)
    # A 1 s interval leaves a quiet second after each commit in which to arm the delay, so
    # the next checkpoint's blob upload is the request that gets held.
    proc = spotrunner_proc(run_args(bucket, interval="1"))
    proc.wait_event("training_started", timeout=60)
    proc.wait_event("checkpoint_committed", timeout=30)
    fault_proxy.delay(25, methods=("POST", "PUT"))  # the upstream stores it; the reply is held
    wait_for(lambda: held_uploads(fault_proxy) > 0 and uncommitted_blob_steps(gcs_emulator, bucket),
             30, "a checkpoint blob upload held in flight by the proxy", interval=0.01)
    committed_before_kill = commits(gcs_emulator, bucket)
    kill(proc)
    fault_proxy.clear()
    assert committed_before_kill, "nothing was committed before the kill"
    newest = committed_before_kill[-1]["step"]
    assert max(uncommitted_blob_steps(gcs_emulator, bucket)) > newest

    # The held blob has no commit record: the restart resumes from the newest commit, not from it.
    proc = spotrunner_proc(run_args(bucket))
    assert proc.wait_event("training_started", timeout=60)["step"] == newest
    time.sleep(rng.uniform(0.2, 1.5))  # a random instant, not a synchronisation
    kill(proc)

    final = spotrunner_proc(run_args(bucket))
    assert completed_digest(final) == reference_digest
    assert not final.find("checkpoint_corrupt")
    # Retention removed the orphan blob of the killed upload along with old checkpoints.
    assert not uncommitted_blob_steps(gcs_emulator, bucket) - {final.wait_event("training_completed")["step"]}


def test_damaged_newest_checkpoint_objects_fall_back_to_the_newest_good_commit(
        spotrunner_proc, gcs_bucket, gcs_emulator, reference_digest):
    proc = spotrunner_proc(run_args(gcs_bucket, interval="0.3"))
    proc.wait_event("training_started", timeout=60)
    wait_for(lambda: len(proc.find("checkpoint_committed")) >= 3, 60, "three committed checkpoints")
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(timeout=30) == exitcodes.STOPPED, proc.output()
    records = commits(gcs_emulator, gcs_bucket)
    assert len(records) >= 3, records
    newest, second, good = records[-1], records[-2], records[-3]
    # The newest: same size, other bytes (the emulator stores a matching crc32c, so only the
    # commit record's sha256 can tell). The one before: truncated to a third (torn).
    original = read_object(gcs_emulator, gcs_bucket, newest["blob"])
    assert len(original) == newest["size"]
    middle = len(original) // 2
    overwritten = original[:middle] + bytes(b ^ 0xFF for b in original[middle:middle + 64]) + original[middle + 64:]
    truncated = read_object(gcs_emulator, gcs_bucket, second["blob"])[:second["size"] // 3]
    for record, damaged in ((newest, overwritten), (second, truncated)):
        gcs_emulator.put_object(bucket_name(gcs_bucket), f"{RUN_ID}/{record['blob']}", damaged)
        assert read_object(gcs_emulator, gcs_bucket, record["blob"]) == damaged

    again = spotrunner_proc(run_args(gcs_bucket))
    digest = completed_digest(again)
    corrupt = again.find("checkpoint_corrupt")
    assert [(e["severity"], e["step"]) for e in corrupt] == [("ERROR", newest["step"]), ("ERROR", second["step"])]
    assert again.wait_event("training_started")["step"] == good["step"]
    assert digest == reference_digest


def test_second_writer_on_the_same_run_is_refused_and_the_first_completes(
        spotrunner_proc, fault_proxy, gcs_emulator, reference_digest):
    bucket = fault_proxy.bucket_url
    first = spotrunner_proc(run_args(bucket))
    first.wait_event("training_started", timeout=60)
    holder = first.wait_event("lease_acquired")
    # Hold every upload reply of the first writer: it cannot finish (its final commit waits),
    # so the second one meets a live holder however fast the first one trains.
    fault_proxy.delay(60, methods=("POST", "PUT"))
    second = spotrunner_proc(run_args(bucket), env=emulator_env(gcs_emulator))
    assert second.wait_exit(timeout=60) == exitcodes.FENCED, second.output()
    assert first.proc.poll() is None, "the first writer ended before the second one was refused"
    fenced = second.wait_event("writer_fenced")
    trainer_pid = first.wait_event("worker_started")["pid"]
    message = fenced["error"]
    assert f"pid {trainer_pid}" in message and "host " in message and "--takeover" in message, message
    assert not second.find("training_started") and not second.find("checkpoint_committed")
    assert second.find("worker_exited", code=exitcodes.FENCED)
    assert holder["reason"] == "absent"

    fault_proxy.clear()
    assert completed_digest(first) == reference_digest


def test_takeover_of_a_live_writer_wins_and_the_old_writer_stops_without_committing(
        spotrunner_proc, fault_proxy, gcs_emulator, reference_digest):
    bucket = fault_proxy.bucket_url
    old = spotrunner_proc(run_args(bucket, interval="100000"))
    old.wait_event("training_started", timeout=60)
    # One checkpoint on request (SIGUSR2 = checkpoint now, keep training), then no more
    # periodic ones: no commit of the old writer is in flight when the new one takes over.
    trainer_pid = old.wait_event("worker_started")["pid"]
    os.kill(trainer_pid, signal.SIGUSR2)
    first_commit = old.wait_event("checkpoint_committed", timeout=30)
    fault_proxy.delay(60, methods=("POST", "PUT"))  # the old writer cannot finish meanwhile

    new = spotrunner_proc(run_args(bucket, "--takeover"), env=emulator_env(gcs_emulator))
    taken = new.wait_event("lease_taken_over", timeout=60)
    assert taken["reason"] == "takeover" and taken["previous_pid"] == trainer_pid
    assert new.wait_event("training_started")["step"] == first_commit["step"]
    assert completed_digest(new) == reference_digest

    fault_proxy.clear()  # the old writer's held uploads return; its next fence check fails
    assert old.wait_exit(timeout=60) == exitcodes.FENCED, old.output()
    assert old.find("writer_fenced")
    assert len(old.find("checkpoint_committed")) == 1, old.output()
    assert not old.find("training_completed")
    writers = {r["step"]: r["writer"]["pid"] for r in commits(gcs_emulator, bucket)}
    assert all(pid != trainer_pid for step, pid in writers.items() if step != first_commit["step"]), writers


def test_store_down_for_30_s_does_not_stall_training(spotrunner_proc, fault_proxy, gcs_emulator):
    bucket = fault_proxy.bucket_url
    # The uninterrupted reference of this longer run trains alongside, on the other core.
    reference = spotrunner_proc(run_args(fresh_bucket(gcs_emulator), size=LONG), env=emulator_env(gcs_emulator))
    proc = spotrunner_proc(run_args(bucket, "--lease-ttl", "20", interval="1", size=LONG))
    proc.wait_event("training_started", timeout=60)
    proc.wait_event("checkpoint_committed", timeout=30)
    down_at = time.monotonic()
    fault_proxy.go_down("reset")
    wait_for(lambda: time.monotonic() - down_at >= 30 or proc.proc.poll() is not None, 35, "30 s of outage")
    up_at = time.monotonic()
    assert proc.proc.poll() is None, "the run ended while the store was down:\n" + proc.output()
    fault_proxy.go_up()

    # Training went on: epochs kept completing through the outage, steps increasing, no long
    # gap, until the outage ended or training had done every step (a fast machine).
    epochs = [e for e in proc.find("epoch_completed") if e["_received"] >= down_at]
    during = [e for e in epochs if e["_received"] <= up_at]
    steps = [e["step"] for e in during]
    assert len(steps) >= 5 and steps == sorted(steps), steps
    marks = [down_at] + [e["_received"] for e in during]
    assert max(b - a for a, b in zip(marks, marks[1:])) < 8, "training stalled while the store was down"
    assert up_at - marks[-1] < 8 or steps[-1] == LONG_STEPS, "training stalled before the store came back"
    warnings = [e for e in proc.events if e.get("severity") == "WARNING" and down_at <= e["_received"] <= up_at + 1]
    assert warnings, "the outage went unreported"

    digest = completed_digest(proc, timeout=240)
    assert not proc.find("checkpoint_corrupt")
    assert digest == completed_digest(reference, timeout=240)
    # Every checkpoint left in the bucket is whole.
    for record in commits(gcs_emulator, bucket):
        data = read_object(gcs_emulator, bucket, record["blob"])
        assert len(data) == record["size"] and hashlib.sha256(data).hexdigest() == record["sha256"], record


def test_emergency_checkpoint_spills_locally_when_the_store_is_too_slow(
        spotrunner_proc, fault_proxy, tmp_path, reference_digest):
    bucket = fault_proxy.bucket_url
    deadline = 6.0
    spill = ["--spill-dir", str(tmp_path / "spill"), "--stop-deadline", str(deadline)]
    proc = spotrunner_proc(run_args(bucket, *spill, interval="100000"))
    proc.wait_event("training_started", timeout=60)
    fault_proxy.delay(60, methods=("POST", "PUT"))  # every upload reply held far past the deadline
    time.sleep(0.5)  # let it train a little; the step assertion below checks it did
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait_exit(timeout=30)
    exited = time.monotonic() - signalled
    spilled = proc.wait_event("checkpoint_spilled")
    assert spilled["step"] > 0
    assert proc.find("emergency_upload_failed")
    committed = proc.find("checkpoint_committed", reason="signal")
    assert len(committed) == 1 and committed[0]["step"] == spilled["step"], proc.output()
    assert spilled["_received"] - signalled < deadline

    fault_proxy.clear()
    again = spotrunner_proc(run_args(bucket, *spill))
    uploaded = again.wait_event("spilled_checkpoint_uploaded", timeout=60)
    assert uploaded["step"] == spilled["step"]
    assert again.wait_event("training_started")["step"] == spilled["step"]
    assert completed_digest(again) == reference_digest

    # Checked last so that the resume above is verified whatever happens here.
    trainer_exit = proc.wait_event("worker_exited")
    assert not proc.find("stop_deadline_passed"), proc.output()
    assert code == exitcodes.STOPPED, proc.output()
    # The trainer is done within the deadline; the supervisor then waits at most 3 s for its
    # session record (session.close(deadline=3.0)), which the slow store cannot take either.
    assert trainer_exit["_received"] - signalled < deadline + 0.5, proc.output()
    assert exited < deadline + 3.5, f"exit took {exited:.1f} s with --stop-deadline {deadline:.0f}"
