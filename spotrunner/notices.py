"""Preemption notices: pluggable sources feeding one watcher that hands each notice over once.

A source watches one signal of the platform and calls `emit(Notice)` when the VM is
about to go away; the watcher runs each source in a daemon thread, drops repeats by
`Notice.id`, and passes the rest to the caller's `emit` (the supervisor puts them on its
event queue). A watcher never knows what happens to a notice.

Sources must treat every failure — 503, 429, timeouts, refused connections, garbage
bodies, replies without `Metadata-Flavor` — as "no information": retry with capped,
jittered exponential backoff, warn at a limited rate, never emit, never die.

Adding a cloud: write a class with a `name` and `run(emit, stop_event)` following
`NoticeSource`, e.g. an AWS source polling IMDSv2 `latest/meta-data/spot/instance-action`
(404 = no notice, a JSON action = Notice(source="aws-spot", id=action+time)) or an Azure
source polling Scheduled Events `metadata/scheduledevents` for `Preempt`/`Terminate`
events (id = EventId, acknowledging is the supervisor's business). Return from `run`
only when `stop_event` is set; check it at least every second or so.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, runtime_checkable

from spotrunner.logs import get_logger
from spotrunner.metadata import MetadataClient

log = get_logger()

PREEMPTED_PATH = "instance/preempted"
MAINTENANCE_PATH = "instance/maintenance-event"
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
# Google's guest agent long-polls for 60 s; the client waits 10 s more (metadata.LONG_POLL_SLACK).
DEFAULT_WAIT_SEC = 60
# A long-poll that answers faster than this without a change (a server that ignores
# wait_for_change or sends no ETag) is paced, so a source never turns into hot polling.
MIN_POLL_INTERVAL = 0.5
WARN_EVERY = 30.0


@dataclass(frozen=True)
class Notice:
    """The VM is about to be stopped: who said so, a stable id for dropping repeats, and when."""

    source: str  # "metadata" | "maintenance" (the supervisor adds "sigterm" | "sigint")
    id: str
    detail: str
    time: float = field(default_factory=time.time)


Emit = Callable[[Notice], None]


@runtime_checkable
class NoticeSource(Protocol):
    """One platform signal, watched by a blocking loop in its own thread.

    `run` calls `emit` for each notice (repeats are fine: the watcher drops them by id),
    handles every error itself, and returns soon after `stop_event` is set. A source that
    blocks in I/O may also define `interrupt()`, which the watcher calls after setting
    `stop_event` to cut the wait short (the GCE sources abort their long-poll).
    """

    name: str

    def run(self, emit: Emit, stop_event: threading.Event) -> None: ...


class Backoff:
    """Capped exponential delays with jitter: base, 2*base, ... up to cap, each times U(0.5, 1)."""

    def __init__(self, base: float = 0.5, cap: float = 10.0):
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


class _FailureLog:
    """Warns about the first failure of a spell, then at most once per `every` seconds."""

    def __init__(self, source: str, every: float = WARN_EVERY):
        self.source = source
        self.every = every
        self.failures = 0
        self.suppressed = 0
        self.last_warned = -float("inf")
        self.first_failed: float | None = None

    def failed(self, error: str, retry_in: float) -> None:
        now = time.monotonic()
        self.failures += 1
        if self.first_failed is None:
            self.first_failed = now
        if now - self.last_warned >= self.every:
            log.warning("notice_source_failed", source=self.source, error=error,
                        failures=self.failures, suppressed=self.suppressed, retry_in=round(retry_in, 2))
            self.last_warned = now
            self.suppressed = 0
        else:
            self.suppressed += 1

    def succeeded(self) -> None:
        if self.failures:
            seconds = time.monotonic() - (self.first_failed or time.monotonic())
            log.info("notice_source_recovered", source=self.source, failures=self.failures,
                     seconds=round(seconds, 1))
        self.failures = 0
        self.suppressed = 0
        self.first_failed = None
        self.last_warned = -float("inf")


class _GceWatchLoop:
    """Shared loop of the GCE sources: a plain GET, then long-polls with ETags, errors retried."""

    name = "gce"
    path = ""

    def __init__(self, client: MetadataClient | None = None, *, wait_timeout_sec: int = DEFAULT_WAIT_SEC,
                 request_timeout: float = 3.0, backoff_base: float = 0.5, backoff_cap: float = 10.0,
                 warn_every: float = WARN_EVERY):
        self.client = client or MetadataClient()
        self.wait_timeout_sec = wait_timeout_sec
        self.request_timeout = request_timeout
        self.backoff = Backoff(backoff_base, backoff_cap)
        self.failures = _FailureLog(self.name, warn_every)

    def interrupt(self) -> None:
        """Cut a long-poll in flight short (called by NoticeWatcher.stop after setting stop_event)."""
        self.client.abort()

    def handle(self, value: str, emit: Emit) -> None:
        """Act on one validated value."""
        raise NotImplementedError

    def validate(self, value: str | None) -> str:
        """The value normalised, or ValueError when it is not one the platform defines."""
        raise NotImplementedError

    def run(self, emit: Emit, stop_event: threading.Event) -> None:
        etag: str | None = None
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                if etag is None:
                    # A plain GET first: a restarted daemon must see a flag already set.
                    raw, new_etag = self.client.get_with_etag(self.path, timeout=self.request_timeout)
                else:
                    raw, new_etag = self.client.wait_for_change(self.path, etag, self.wait_timeout_sec)
                value = self.validate(raw)
            except Exception as exc:  # everything: a watcher thread must never die
                if stop_event.is_set():
                    return  # the failure is stop() cutting the long-poll short
                etag = None  # start again with a plain GET; nothing from a bad answer is kept
                delay = self.backoff.next_delay()
                self.failures.failed(f"{type(exc).__name__}: {exc}", delay)
                stop_event.wait(delay)
                continue
            if stop_event.is_set():
                return
            self.backoff.reset()
            self.failures.succeeded()
            unchanged = new_etag == etag
            etag = new_etag
            try:
                self.handle(value, emit)
            except Exception as exc:  # pragma: no cover - emit is the watcher's, which guards itself
                log.error("notice_source_failed", source=self.name, error=f"{type(exc).__name__}: {exc}")
            if unchanged or new_etag == "NONE":
                # No change and an early answer means the server did not hold the request.
                remaining = MIN_POLL_INTERVAL - (time.monotonic() - started)
                if remaining > 0:
                    stop_event.wait(remaining)


class GcePreemptedSource(_GceWatchLoop):
    """Emits Notice(source="metadata") when `instance/preempted` reads TRUE."""

    name = "metadata"
    path = PREEMPTED_PATH

    def validate(self, value: str | None) -> str:
        text = (value or "").strip().upper()
        if text not in ("TRUE", "FALSE"):
            raise ValueError(f"{self.path} answered {str(value)[:60]!r}, not TRUE or FALSE")
        return text

    def handle(self, value: str, emit: Emit) -> None:
        if value == "TRUE":
            emit(Notice(source="metadata", id="gce-preempted",
                        detail=f"{self.path} is TRUE (host {self.client.host})"))


class GceMaintenanceSource(_GceWatchLoop):
    """Emits Notice(source="maintenance") on TERMINATE_ON_HOST_MAINTENANCE; MIGRATE and NONE are logged."""

    name = "maintenance"
    path = MAINTENANCE_PATH

    def __init__(self, client: MetadataClient | None = None, **kwargs):
        super().__init__(client, **kwargs)
        self._last: str | None = None

    def validate(self, value: str | None) -> str:
        text = (value or "").strip().upper()
        if text not in MAINTENANCE_VALUES:
            raise ValueError(f"{self.path} answered {str(value)[:60]!r}, not one of {', '.join(MAINTENANCE_VALUES)}")
        return text

    def handle(self, value: str, emit: Emit) -> None:
        if value != self._last:
            log.info("maintenance_event_observed", value=value, previous=self._last)
            self._last = value
        if value == "TERMINATE_ON_HOST_MAINTENANCE":
            emit(Notice(source="maintenance", id=f"gce-maintenance-{value}",
                        detail=f"{self.path} is {value} (host {self.client.host})"))


def gce_sources(client: MetadataClient | None = None, **kwargs) -> list[NoticeSource]:
    """The GCE sources sharing one client: preemption flag and maintenance event."""
    client = client or MetadataClient()
    return [GcePreemptedSource(client, **kwargs), GceMaintenanceSource(client, **kwargs)]


class NoticeWatcher:
    """Runs each source in a daemon thread and passes every new notice (by id) to `emit` once.

    `emit` is called from the source threads; keep it quick (put the notice on a queue).
    `stop()` returns within about a second even while a source sits in a long-poll: it
    interrupts sources that can be, the threads are daemons whatever happens, and
    anything a source finds after stop() is dropped.
    """

    def __init__(self, sources: Iterable[NoticeSource], emit: Emit, *, restart_delay: float = 1.0):
        self.sources = list(sources)
        self._emit = emit
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._restart_delay = restart_delay

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    @property
    def alive_threads(self) -> int:
        """Source threads still running (0 soon after stop() for interruptible sources)."""
        return sum(thread.is_alive() for thread in self._threads)

    @property
    def seen_ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._seen)

    def start(self) -> None:
        """Start one daemon thread per source; calling it again does nothing."""
        if self._threads:
            return
        for source in self.sources:
            name = getattr(source, "name", type(source).__name__)
            thread = threading.Thread(target=self._run_source, args=(source, name),
                                      name=f"notice-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        log.info("notice_watcher_started", sources=[getattr(s, "name", "?") for s in self.sources])

    def stop(self, timeout: float = 1.0) -> None:
        """Ask every source to stop and wait up to `timeout` s in all; never blocks longer."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for source in self.sources:
            interrupt = getattr(source, "interrupt", None)
            if interrupt is not None:
                try:
                    interrupt()
                except Exception as exc:  # stopping must not fail; the join below is bounded anyway
                    log.warning("notice_source_interrupt_failed", source=getattr(source, "name", "?"),
                                error=f"{type(exc).__name__}: {exc}")
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _deliver(self, notice: Notice) -> None:
        with self._lock:
            if self._stop.is_set() or notice.id in self._seen:
                return
            self._seen.add(notice.id)
        log.info("notice_received", source=notice.source, id=notice.id, detail=notice.detail)
        try:
            self._emit(notice)
        except Exception as exc:
            log.error("notice_delivery_failed", source=notice.source, id=notice.id,
                      error=f"{type(exc).__name__}: {exc}")

    def _run_source(self, source: NoticeSource, name: str) -> None:
        # Sources catch their own errors; this is the last line, so a bug in one is
        # logged and the source restarted rather than the watch silently ending.
        while not self._stop.is_set():
            try:
                source.run(self._deliver, self._stop)
                return
            except Exception as exc:
                log.error("notice_source_crashed", source=name, error=f"{type(exc).__name__}: {exc}",
                          retry_in=self._restart_delay)
                self._stop.wait(self._restart_delay)
