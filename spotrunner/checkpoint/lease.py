"""The writer lease: one record (`lease.json`) that says which process may commit checkpoints to a run.

Fencing works through the store's compare-and-swap alone (`read_versioned` + `replace`), so
it behaves the same on a local directory and on GCS. Every take, renewal and release is a
CAS on the generation just read: of two racers exactly one wins, the other re-reads and
sees a live holder.

Who may take a lease that someone else holds (the record names host, boot id, pid and the
pid's start time, so a dead or reused pid is told apart from a live writer):
- absent, or released by a clean exit                          -> take
- same host and boot, and that pid is gone, reused or a zombie -> take at once
- same host, different boot id (rebooted or recreated VM)      -> take at once
- not renewed within its ttl                                   -> take
- `takeover=True` (the operator made sure the writer is gone)  -> take
- otherwise (a live writer, here or elsewhere)                 -> FencedError naming it
Expiry compares the holder's `renewed_at` with this host's clock, so hosts should run NTP
(GCE VMs do).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from spotrunner import history
from spotrunner.errors import FencedError, NotFound, PreconditionFailed, StoreError
from spotrunner.logs import get_logger
from spotrunner.stores import Generation, Store

log = get_logger()

FORMAT = 1
_ACQUIRE_ATTEMPTS = 5
# A holder whose parent was just SIGKILLed may be seconds from dying itself; look again
# for this long before calling it a live second writer.
_DYING_RECHECK_SECONDS = 3.0


def boot_id() -> str:
    """This machine's boot id (changes on every boot, and on a recreated VM)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None when the pid does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses; it ends at the last ')'.
    return text.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (/proc/PID/stat field 22), or None if gone."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def _is_alive(pid: int, start_time: Any) -> bool:
    """True when `pid` runs (not a zombie) and is the same process that started at `start_time`."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    fields = _proc_stat(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X", "x"):
        return False
    return start_time is None or int(fields[19]) == start_time


def _may_be_dying(pid: int) -> bool:
    """True when a live holder looks like it is on its way out: orphaned, or a SIGKILL is pending."""
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] == "D" or int(fields[1]) == 1:
        return True
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & (1 << 8):
                    return True  # bit 8 is signal 9, SIGKILL
    except (OSError, ValueError):
        return True
    return False


def _iso(timestamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def describe(record: dict[str, Any], now: float | None = None) -> str:
    """'host H pid P session S, since T, last renewed N s ago' for a lease record."""
    now = time.time() if now is None else now
    renewed = record.get("renewed_at")
    age = f"{max(0.0, now - float(renewed)):.0f} s ago" if isinstance(renewed, (int, float)) else "never"
    return (f"host {record.get('host')} pid {record.get('pid')} session {record.get('session_id')}, "
            f"since {_iso(record.get('acquired_at'))}, last renewed {age}")


class Lease:
    """The writer lease of `store`'s run for this process; see the module docstring for the rules."""

    def __init__(self, store: Store, session_id: str, ttl: float, takeover: bool = False):
        if ttl <= 0:
            raise ValueError("lease ttl must be greater than 0")
        self.store = store
        self.session_id = session_id
        self.ttl = float(ttl)
        self.takeover = takeover
        self.host = socket.gethostname()
        self.boot_id = boot_id()
        self.pid = os.getpid()
        self.pid_start_time = process_start_time(self.pid)
        self._generation: Generation | None = None
        self._record: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None
        self._released = False
        # Renewal and release must not hang for the client's default retry window; pass a
        # deadline where the store accepts one (GCSStore does, LocalStore needs none).
        self._io_deadline = max(1.0, min(10.0, self.ttl / 4))
        try:
            self._replace_takes_deadline = "deadline" in inspect.signature(store.replace).parameters
            self._read_takes_deadline = "deadline" in inspect.signature(store.read_versioned).parameters
        except (TypeError, ValueError):
            self._replace_takes_deadline = self._read_takes_deadline = False

    @property
    def generation(self) -> Generation | None:
        """The store generation of our lease record (None before acquire)."""
        with self._lock:
            return self._generation

    # -- store access -----------------------------------------------------------------

    def _read(self, deadline: float | None = None) -> tuple[dict[str, Any] | None, Generation | None]:
        """The current lease record and its generation; (None, None) when absent."""
        try:
            if deadline is not None and self._read_takes_deadline:
                data, generation = self.store.read_versioned(history.LEASE_KEY, deadline=deadline)  # type: ignore[call-arg]
            else:
                data, generation = self.store.read_versioned(history.LEASE_KEY)
        except NotFound:
            return None, None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        # An unreadable record is treated like a released one, but still taken by CAS.
        return (record if isinstance(record, dict) else {"released": True, "unreadable": True}), generation

    def _write(self, record: dict[str, Any], if_generation: Generation | None,
               deadline: float | None = None) -> Generation:
        data = history.encode(record)
        if deadline is not None and self._replace_takes_deadline:
            return self.store.replace(history.LEASE_KEY, data, if_generation=if_generation,  # type: ignore[call-arg]
                                      deadline=deadline)
        return self.store.replace(history.LEASE_KEY, data, if_generation=if_generation)

    def _new_record(self, now: float) -> dict[str, Any]:
        return {
            "format": FORMAT, "host": self.host, "boot_id": self.boot_id, "pid": self.pid,
            "pid_start_time": self.pid_start_time, "session_id": self.session_id,
            "acquired_at": now, "renewed_at": now, "ttl": self.ttl, "released": False,
        }

    def _is_mine(self, record: dict[str, Any] | None) -> bool:
        return bool(record) and not record.get("released") and record.get("host") == self.host \
            and record.get("boot_id") == self.boot_id and record.get("pid") == self.pid \
            and record.get("pid_start_time") == self.pid_start_time and record.get("session_id") == self.session_id

    # -- taking ---------------------------------------------------------------------------

    def _why_takeable(self, record: dict[str, Any] | None, now: float) -> str | None:
        """The reason we may take the lease from `record`'s holder, or None when it is live."""
        if record is None:
            return "absent"
        if record.get("released"):
            return "released"
        if self._is_mine(record):
            return "ours"
        same_host = record.get("host") == self.host
        if same_host and record.get("boot_id") and record.get("boot_id") != self.boot_id:
            return "rebooted"
        if same_host and record.get("boot_id") == self.boot_id \
                and not _is_alive(record.get("pid"), record.get("pid_start_time")):
            return "holder_dead"
        renewed, ttl = record.get("renewed_at"), record.get("ttl")
        if not isinstance(renewed, (int, float)) or not isinstance(ttl, (int, float)) or now - renewed > ttl:
            return "expired"
        if self.takeover:
            return "takeover"
        return None

    def _refusal(self, record: dict[str, Any], now: float) -> str:
        renewed = record.get("renewed_at")
        ttl = record.get("ttl")
        remaining = max(0.0, float(renewed) + float(ttl) - now) if isinstance(renewed, (int, float)) \
            and isinstance(ttl, (int, float)) else 0.0
        return (f"run {self.store.url} has another live writer: {describe(record, now)}; make sure that writer "
                f"is gone, then rerun with --takeover, or wait for its lease to expire in {remaining:.0f} s")

    def acquire(self) -> None:
        """Take the lease for this process; FencedError (naming the other writer) if a live one holds it."""
        for _attempt in range(_ACQUIRE_ATTEMPTS):
            record, generation = self._read()
            now = time.time()
            reason = self._why_takeable(record, now)
            if reason is None and record is not None and record.get("host") == self.host \
                    and _may_be_dying(record.get("pid")):
                reason = self._wait_for_exit(record)
            if reason is None:
                raise FencedError(self._refusal(record, time.time()))
            mine = self._new_record(time.time())
            try:
                new_generation = self._write(mine, generation)
            except PreconditionFailed:
                continue  # someone else wrote in between: look again at who holds it now
            with self._lock:
                self._generation, self._record = new_generation, mine
                self._released = False
                self._lost = None
            if reason in ("absent", "released", "ours"):
                log.info("lease_acquired", reason=reason, ttl=self.ttl)
            else:
                log.warning("lease_taken_over", reason=reason, previous_host=record.get("host"),
                            previous_pid=record.get("pid"), previous_session=record.get("session_id"),
                            previous_renewed_at=record.get("renewed_at"))
            return
        raise FencedError(f"run {self.store.url}: the lease changed hands {_ACQUIRE_ATTEMPTS} times while "
                          "taking it; another writer is starting, make sure only one runs")

    def _wait_for_exit(self, record: dict[str, Any]) -> str | None:
        """Give a same-host holder that looks like it is dying a few seconds to go; "holder_dead" if it did."""
        end = time.monotonic() + _DYING_RECHECK_SECONDS
        while time.monotonic() < end:
            if not _is_alive(record.get("pid"), record.get("pid_start_time")):
                return "holder_dead"
            time.sleep(0.1)
        return None

    # -- holding --------------------------------------------------------------------------

    def check(self) -> None:
        """Return if the lease is still ours; FencedError if it was lost (StoreError if the store failed)."""
        with self._lock:
            if self._lost:
                raise FencedError(self._lost)
            if self._record is None or self._released:
                raise FencedError(f"run {self.store.url}: this writer holds no lease (not acquired or released)")
        record, _generation = self._read(deadline=self._io_deadline)
        # Our record's content identifies us; a renewal racing this read changes only renewed_at.
        if not self._is_mine(record):
            raise FencedError(self._lost_message(record))

    def _lost_message(self, record: dict[str, Any] | None) -> str:
        if record is None:
            return f"run {self.store.url}: our lease record disappeared; stopping so two writers never commit"
        return (f"run {self.store.url}: lease lost, another writer took over ({describe(record)}); "
                "this writer stops without committing")

    def renew(self) -> None:
        """Extend the lease once by CAS; FencedError if someone else took it, StoreError if the store failed."""
        with self._lock:
            if self._record is None or self._released:
                raise FencedError(f"run {self.store.url}: this writer holds no lease")
            record = dict(self._record, renewed_at=time.time())
            generation = self._generation
        try:
            new_generation = self._write(record, generation, deadline=self._io_deadline)
        except PreconditionFailed:
            current, current_generation = self._read(deadline=self._io_deadline)
            if not self._is_mine(current):
                raise FencedError(self._lost_message(current)) from None
            # Our own earlier renewal landed but its reply was lost: adopt its generation.
            with self._lock:
                self._generation, self._record = current_generation, current
            return
        with self._lock:
            if not self._released:
                self._generation, self._record = new_generation, record

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ttl/4 in a daemon thread; `on_lost(message)` is called once if another writer takes over."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, args=(on_lost,), name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self, on_lost: Callable[[str], None]) -> None:
        interval = self.ttl / 4
        wait = interval
        failures = 0
        while not self._stop.wait(wait):
            try:
                self.renew()
            except FencedError as exc:
                with self._lock:
                    if self._released:
                        return
                    self._lost = str(exc)
                log.error("lease_lost", error=str(exc))
                try:
                    on_lost(str(exc))
                except Exception as callback_error:  # noqa: BLE001 - the thread must end quietly
                    log.error("lease_lost_callback_failed", error=repr(callback_error))
                return
            except (StoreError, OSError) as exc:
                failures += 1
                # Back off, but keep trying well within the ttl: a lease not renewed for a
                # whole ttl may be taken by a newcomer.
                wait = min(interval, min(1.0, interval / 2) * 2 ** (failures - 1))
                log.warning("lease_renewal_failed", error=str(exc), failures=failures, retry_in=round(wait, 2))
                continue
            if failures:
                log.info("lease_renewal_recovered", failures=failures)
            failures = 0
            wait = interval

    def stop_renewing(self, within: float | None = None) -> None:
        """Stop the renewal thread (waits for a renewal in flight, at most `within` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._io_deadline + 5 if within is None else max(0.0, within))

    def release(self, within: float | None = None) -> None:
        """Mark the lease released so the next start need not wait; never raises (best effort on exit).

        `within` bounds the whole call in seconds: on the stop path the VM may have only
        moments left, and an unreleased lease costs nothing on this host (it is taken at
        once when its holder is gone).
        """
        started = time.monotonic()
        self.stop_renewing(within)
        io_deadline = self._io_deadline
        if within is not None:
            io_deadline = min(io_deadline, within - (time.monotonic() - started))
            if io_deadline < 0.2:
                log.warning("lease_release_skipped", reason="no time left before the stop deadline")
                return
        with self._lock:
            if self._record is None or self._released or self._lost:
                self._released = True
                return
            record = dict(self._record, released=True, renewed_at=time.time())
            generation = self._generation
            self._released = True
        try:
            self._write(record, generation, deadline=io_deadline)
        except PreconditionFailed:
            log.warning("lease_release_skipped", reason="another writer holds the lease now")
            return
        except (StoreError, OSError) as exc:
            log.warning("lease_release_failed", error=str(exc),
                        hint="the next start on this host takes it at once; elsewhere it waits for the ttl")
            return
        log.info("lease_released")
