"""The writer lease on LocalStore and GCSStore: who may take it, fencing, renewal, races."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from spotrunner import history
from spotrunner.checkpoint.lease import Lease, boot_id
from spotrunner.errors import FencedError
from spotrunner.stores import open_store
from tests.support.processes import REPO, wait_for

_HOLDER = """
import sys
from spotrunner.checkpoint.lease import Lease
from spotrunner.stores import open_store
url, run_id, session, ttl, marker = sys.argv[1:6]
lease = Lease(open_store(url, run_id), session_id=session, ttl=float(ttl), takeover=False)
lease.acquire()
open(marker, "w").close()
sys.stdin.read()  # hold the lease, unrenewed, until the test closes stdin or kills us
"""


@pytest.fixture(params=["local", "gcs"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("gcs_bucket")


@pytest.fixture
def store(store_url):
    return open_store(store_url, "run-1")


@pytest.fixture
def holder(store_url, tmp_path):
    """Start another process that takes the lease of run-1 and keeps it; returns its Popen."""
    started: list[subprocess.Popen] = []

    def start(session: str = "other-session", ttl: float = 60.0) -> subprocess.Popen:
        marker = tmp_path / f"held-{len(started)}"
        log = open(tmp_path / f"holder-{len(started)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, store_url, "run-1", session, str(ttl), str(marker)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        started.append(proc)
        wait_for(lambda: marker.exists() or proc.poll() is not None, 30, "the holder to take the lease")
        assert proc.poll() is None, (tmp_path / f"holder-{len(started) - 1}.log").read_text()
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _record(store) -> dict:
    return json.loads(store.read(history.LEASE_KEY))


def _plant(store, **fields) -> None:
    """Write a lease record of some other writer straight into the store."""
    now = time.time()
    record = {"format": 1, "host": "other-host", "boot_id": "other-boot", "pid": 4242, "pid_start_time": 1,
              "session_id": "planted", "acquired_at": now - 5, "renewed_at": now, "ttl": 60.0, "released": False}
    record.update(fields)
    store.put(history.LEASE_KEY, history.encode(record))


def test_first_acquire_writes_the_record(store):
    lease = Lease(store, session_id="s1", ttl=30, takeover=False)
    lease.acquire()
    record = _record(store)
    assert record["host"] and record["boot_id"] == boot_id() and record["pid"] == os.getpid()
    assert isinstance(record["pid_start_time"], int)
    assert record["session_id"] == "s1" and record["ttl"] == 30 and record["released"] is False
    assert record["acquired_at"] == record["renewed_at"] <= time.time()
    assert lease.generation == store.read_versioned(history.LEASE_KEY)[1]
    lease.check()


def test_a_live_holder_in_another_process_is_refused(store, holder):
    proc = holder(session="sess-live")
    with pytest.raises(FencedError) as refused:
        Lease(store, session_id="me", ttl=30).acquire()
    message = str(refused.value)
    assert f"pid {proc.pid}" in message and "session sess-live" in message
    assert "last renewed" in message and "--takeover" in message and "expire in" in message
    assert "\n" not in message
    assert _record(store)["pid"] == proc.pid  # untouched


def test_a_dead_holder_on_this_host_is_taken_at_once(store, holder):
    proc = holder(session="sess-dead")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    started = time.monotonic()
    Lease(store, session_id="me", ttl=30).acquire()
    assert time.monotonic() - started < 2
    assert _record(store)["session_id"] == "me"


def test_a_reused_pid_is_not_mistaken_for_the_holder(store):
    # Our own pid, but a different start time: the holder was an earlier process with this pid.
    _plant(store, host=Lease(store, "x", 1).host, boot_id=boot_id(), pid=os.getpid(), pid_start_time=1)
    Lease(store, session_id="me", ttl=30).acquire()
    assert _record(store)["session_id"] == "me"


def test_a_holder_from_an_earlier_boot_is_taken_at_once(store):
    lease = Lease(store, session_id="me", ttl=30)
    # Same host, an alive pid (our parent), but another boot: the VM rebooted or was recreated.
    _plant(store, host=lease.host, boot_id="0000-earlier-boot", pid=os.getppid())
    lease.acquire()
    assert _record(store)["boot_id"] == boot_id()


def test_an_expired_lease_is_taken_and_a_fresh_one_elsewhere_is_not(store):
    _plant(store, renewed_at=time.time())
    with pytest.raises(FencedError) as refused:
        Lease(store, session_id="me", ttl=30).acquire()
    assert "host other-host" in str(refused.value) and "session planted" in str(refused.value)
    _plant(store, renewed_at=time.time() - 61, ttl=60.0)
    Lease(store, session_id="me", ttl=30).acquire()
    assert _record(store)["session_id"] == "me"


def test_takeover_takes_from_a_live_holder_and_the_old_one_is_fenced(store):
    old = Lease(store, session_id="old", ttl=30)
    old.acquire()
    with pytest.raises(FencedError):
        Lease(store, session_id="new", ttl=30).acquire()  # two writers on one host: refused
    new = Lease(store, session_id="new", ttl=30, takeover=True)
    new.acquire()
    new.check()
    with pytest.raises(FencedError) as fenced:
        old.check()
    assert "session new" in str(fenced.value)
    old.release()  # must not clobber the new holder's record
    assert _record(store)["session_id"] == "new" and _record(store)["released"] is False


def test_renewal_keeps_the_lease_and_reports_a_takeover_once(store):
    mine = Lease(store, session_id="mine", ttl=0.6)
    mine.acquire()
    first = mine.generation
    lost: list[str] = []
    mine.start_renewing(lost.append)
    try:
        wait_for(lambda: mine.generation != first, 5, "a renewal")
        elsewhere = Lease(store, session_id="elsewhere", ttl=0.6)
        elsewhere.host = "other-host"  # as if on another VM
        # Well past one ttl since the first acquire: only renewals keep it ours.
        wait_for(lambda: time.time() - _record(store)["acquired_at"] > 1.5, 5, "more than two ttls")
        with pytest.raises(FencedError):
            elsewhere.acquire()
        mine.check()

        thief = Lease(store, session_id="thief", ttl=30, takeover=True)
        thief.host = "other-host"
        thief.acquire()
        wait_for(lambda: lost, 5, "on_lost to be called")
        assert len(lost) == 1 and "session thief" in lost[0]
        with pytest.raises(FencedError):
            mine.check()
        assert _record(store)["session_id"] == "thief"
    finally:
        mine.release()
    assert _record(store)["session_id"] == "thief"


def test_release_lets_the_next_writer_in_at_once(store):
    first = Lease(store, session_id="first", ttl=300)
    first.acquire()
    first.start_renewing(lambda message: None)
    first.release()
    assert _record(store)["released"] is True
    with pytest.raises(FencedError):
        first.check()
    second = Lease(store, session_id="second", ttl=300)
    second.host = "other-host"
    second.acquire()
    assert _record(store)["session_id"] == "second"


def test_two_racers_exactly_one_wins(store_url):
    for round_ in range(3):
        store = open_store(store_url, f"race-{round_}")
        racers = []
        for index in range(2):
            lease = Lease(open_store(store_url, f"race-{round_}"), session_id=f"racer-{index}", ttl=30)
            lease.host = f"host-{index}"  # two VMs starting the same run at once
            racers.append(lease)
        barrier = threading.Barrier(2, timeout=10)
        outcomes: dict[int, str] = {}

        def race(index: int) -> None:
            barrier.wait()
            try:
                racers[index].acquire()
                outcomes[index] = "won"
            except FencedError:
                outcomes[index] = "fenced"

        threads = [threading.Thread(target=race, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes.values()) == ["fenced", "won"], outcomes
        winner = [index for index, outcome in outcomes.items() if outcome == "won"][0]
        assert _record(store)["session_id"] == f"racer-{winner}"
