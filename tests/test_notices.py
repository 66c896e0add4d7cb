"""Notice sources and the watcher against the tests' real metadata server."""

from __future__ import annotations

import threading
import time

import pytest

from spotrunner.metadata import MetadataClient
from spotrunner.notices import (
    GceMaintenanceSource,
    GcePreemptedSource,
    Notice,
    NoticeSource,
    NoticeWatcher,
)
from tests.support.processes import wait_for

PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
# Fast backoff so fault spells pass in a fraction of a second.
FAST = {"backoff_base": 0.02, "backoff_cap": 0.1, "request_timeout": 0.5}


class Collector:
    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.lock = threading.Lock()

    def __call__(self, notice: Notice) -> None:
        with self.lock:
            self.notices.append(notice)

    def snapshot(self) -> list[Notice]:
        with self.lock:
            return list(self.notices)


@pytest.fixture
def watch(metadata_server):
    """start(*source_classes, **source_kwargs) -> (watcher, collector); watchers stopped at teardown."""
    watchers: list[NoticeWatcher] = []

    def start(*kinds, **kwargs):
        client = MetadataClient()
        collector = Collector()
        options = {**FAST, **kwargs}
        watcher = NoticeWatcher([kind(client, **options) for kind in kinds], collector)
        watchers.append(watcher)
        watcher.start()
        return watcher, collector

    yield start
    for watcher in watchers:
        watcher.stop()


def wait_long_poll(server, path: str) -> None:
    wait_for(lambda: server.long_polls_waiting(path) > 0, 5, f"a long-poll of {path} held by the server")


def test_sources_follow_the_protocol():
    client = MetadataClient("127.0.0.1:9")
    assert isinstance(GcePreemptedSource(client), NoticeSource)
    assert isinstance(GceMaintenanceSource(client), NoticeSource)


def test_existing_true_is_seen_at_start(metadata_server, watch):
    metadata_server.preempt()
    _, collector = watch(GcePreemptedSource)
    notices = wait_for(collector.snapshot, 3, "a preemption notice")
    assert [(n.source, n.id) for n in notices] == [("metadata", "gce-preempted")]
    assert abs(notices[0].time - time.time()) < 5


def test_flip_arrives_through_a_long_poll_within_a_second(metadata_server, watch):
    _, collector = watch(GcePreemptedSource)
    wait_long_poll(metadata_server, PREEMPTED)
    # Observation window: a hot-polling watcher would make many requests in it.
    time.sleep(1.0)
    assert metadata_server.requests_for(PREEMPTED) == 2  # one plain GET, one held long-poll
    assert collector.snapshot() == []
    flipped = time.monotonic()
    metadata_server.preempt()
    notices = wait_for(collector.snapshot, 2, "a preemption notice")
    assert time.monotonic() - flipped < 1.0
    assert notices[0].source == "metadata"


@pytest.mark.parametrize("status", [503, 429])
def test_error_storm_is_not_a_notice_and_recovers(metadata_server, watch, status):
    metadata_server.fail_next(8, status)
    _, collector = watch(GcePreemptedSource)
    wait_for(lambda: metadata_server.faults["fail_next"] == 0, 10, "the error storm to be consumed")
    wait_long_poll(metadata_server, PREEMPTED)
    assert collector.snapshot() == []
    metadata_server.preempt()
    assert wait_for(collector.snapshot, 3, "a notice after recovery")[0].source == "metadata"


def test_slow_answers_are_not_a_notice(metadata_server, watch):
    metadata_server.set_delay(1.0)  # longer than the source's 0.5 s request timeout
    _, collector = watch(GcePreemptedSource)
    wait_for(lambda: metadata_server.requests_for(PREEMPTED) >= 3, 10, "retries of slow requests")
    assert collector.snapshot() == []
    metadata_server.set_delay(0)
    wait_long_poll(metadata_server, PREEMPTED)
    metadata_server.preempt()
    wait_for(collector.snapshot, 3, "a notice once answers are quick again")


@pytest.mark.parametrize("bad_value", [None, "maybe", "TRUEISH"])
def test_garbage_is_not_a_notice(metadata_server, watch, bad_value):
    if bad_value is None:
        metadata_server.set_garbage(True)
    else:
        metadata_server.set_value(PREEMPTED, bad_value)
    _, collector = watch(GcePreemptedSource)
    wait_for(lambda: metadata_server.requests_for(PREEMPTED) >= 4, 10, "retries after garbage")
    assert collector.snapshot() == []
    metadata_server.clear_faults()
    metadata_server.preempt()
    wait_for(collector.snapshot, 3, "a notice once the answer is TRUE")


def test_true_without_flavor_header_is_not_trusted(metadata_server, watch):
    metadata_server.preempt()
    metadata_server.drop_flavor_header(True)
    _, collector = watch(GcePreemptedSource)
    wait_for(lambda: metadata_server.requests_for(PREEMPTED) >= 4, 10, "retries of untrusted answers")
    assert collector.snapshot() == []
    metadata_server.drop_flavor_header(False)
    wait_for(collector.snapshot, 3, "a notice once the answer is genuine")


def test_maintenance_terminate_is_a_notice_migrate_is_not(metadata_server, watch):
    _, collector = watch(GceMaintenanceSource)
    wait_long_poll(metadata_server, MAINTENANCE)
    before = metadata_server.requests_for(MAINTENANCE)
    metadata_server.set_maintenance("MIGRATE_ON_HOST_MAINTENANCE")
    # The source has seen MIGRATE once it is back in a long-poll after that answer.
    wait_for(lambda: metadata_server.requests_for(MAINTENANCE) > before
             and metadata_server.long_polls_waiting(MAINTENANCE) > 0, 5, "MIGRATE to be read")
    assert collector.snapshot() == []
    metadata_server.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    notices = wait_for(collector.snapshot, 3, "a maintenance notice")
    assert [n.source for n in notices] == ["maintenance"]
    assert "TERMINATE_ON_HOST_MAINTENANCE" in notices[0].detail


def test_repeats_are_dropped_by_id(metadata_server, watch):
    metadata_server.preempt()
    # Short long-polls: each one answers TRUE again, so the source emits repeatedly.
    _, collector = watch(GcePreemptedSource, wait_timeout_sec=1)
    wait_for(lambda: metadata_server.requests_for(PREEMPTED) >= 3, 5, "repeated answers of TRUE")
    assert len(collector.snapshot()) == 1


class ScriptedSource:
    """A source that emits a fixed list of notices, then waits for stop; or raises once."""

    def __init__(self, name: str, notices: list[Notice], crash_first: bool = False):
        self.name = name
        self.notices = notices
        self.crash_first = crash_first
        self.runs = 0

    def run(self, emit, stop_event: threading.Event) -> None:
        self.runs += 1
        if self.crash_first and self.runs == 1:
            raise RuntimeError("bug in a source")
        for notice in self.notices:
            emit(notice)
        stop_event.wait()


def test_watcher_dedups_across_sources_and_survives_crashes():
    got = Collector()
    first = Notice("metadata", "gce-preempted", "a")
    sources = [
        ScriptedSource("a", [first, first, Notice("maintenance", "m1", "b")]),
        ScriptedSource("b", [first], crash_first=True),
    ]
    watcher = NoticeWatcher(sources, got, restart_delay=0.05)
    watcher.start()
    try:
        wait_for(lambda: sources[1].runs >= 2, 3, "the crashed source to be restarted")
        wait_for(lambda: len(got.snapshot()) >= 2, 3, "both distinct notices")
        assert sorted(n.id for n in got.snapshot()) == ["gce-preempted", "m1"]
    finally:
        watcher.stop()


def test_emit_errors_do_not_stop_the_watcher():
    delivered = []

    def emit(notice: Notice) -> None:
        delivered.append(notice.id)
        if notice.id == "first":
            raise RuntimeError("supervisor queue full")

    source = ScriptedSource("a", [Notice("metadata", "first", ""), Notice("metadata", "second", "")])
    watcher = NoticeWatcher([source], emit)
    watcher.start()
    try:
        wait_for(lambda: delivered == ["first", "second"], 3, "both notices despite an emit error")
    finally:
        watcher.stop()


def test_stop_returns_promptly_mid_long_poll(metadata_server):
    client = MetadataClient()
    collector = Collector()
    watcher = NoticeWatcher([GcePreemptedSource(client, wait_timeout_sec=60),
                             GceMaintenanceSource(client, wait_timeout_sec=60)], collector)
    watcher.start()
    wait_long_poll(metadata_server, PREEMPTED)
    wait_long_poll(metadata_server, MAINTENANCE)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0
    assert not watcher.running
    # The long-polls were cut short, not left to run out their 60 s.
    assert watcher.alive_threads == 0
    metadata_server.preempt()
    assert collector.snapshot() == []


def test_nothing_is_delivered_after_stop():
    got = Collector()
    release = threading.Event()

    class LateSource:
        name = "late"

        def run(self, emit, stop_event):
            release.wait(5)  # ignores stop, like a source stuck in I/O that cannot be interrupted
            emit(Notice("metadata", "late", ""))

    watcher = NoticeWatcher([LateSource()], got)
    watcher.start()
    started = time.monotonic()
    watcher.stop(timeout=0.2)
    assert time.monotonic() - started < 1.0
    release.set()
    wait_for(lambda: watcher.alive_threads == 0, 5, "the late source to finish")
    assert got.snapshot() == []
