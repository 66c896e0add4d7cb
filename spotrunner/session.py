"""The supervisor's record of this session in the store (`sessions/<id>.json`, see history.py).

Only this session's supervisor writes its record, so plain overwrites are safe. Writes
happen on a background thread at most every FLUSH_EVERY seconds (GCS allows one write per
second per object name) or at once for a notice or the end, and never block the loop.
Nothing is written until the trainer reports training, so a refused second writer
leaves no trace in the run.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from spotrunner import history
from spotrunner.logs import get_logger
from spotrunner.stores import Store

log = get_logger()

FLUSH_EVERY = 10.0
THROUGHPUT_EVERY = 30.0
PREEMPTION_SOURCES = ("metadata", "maintenance")


def new_session_id() -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{socket.gethostname()[:40]}-{uuid.uuid4().hex[:6]}"


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


class SessionRecorder:
    def __init__(self, store: Store | None, run_id: str, facts: dict[str, Any], session_id: str | None = None):
        self.store = store
        self.session_id = session_id or new_session_id()
        self.key = history.session_key(self.session_id)
        now = time.time()
        self.record: dict[str, Any] = {
            "format": history.FORMAT, "session_id": self.session_id, "run_id": run_id,
            "host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
            "zone": facts.get("zone"), "machine_type": facts.get("machine_type"),
            "provisioning_model": facts.get("provisioning_model"), "gpus": facts.get("gpus") or [],
            "started_at": now, "updated_at": now, "ended_at": None, "state": "running",
            "end_reason": None, "exit_code": None, "notices": [], "trainer_starts": [],
            "last_step": 0, "total_steps": None, "epoch": 0, "lost_steps": 0,
            "checkpoints": [], "metrics": [], "throughput": [],
        }
        self.high_water_step = self._earlier_high_water_step()
        self._lock = threading.Lock()
        self._active = False  # becomes True once the trainer trains; nothing is written before
        self._dirty = False
        self._urgent = threading.Event()
        self._closed = False
        self._last_flush = 0.0
        self._last_throughput = 0.0
        self._written = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="session-record", daemon=True)
        self._thread.start()

    def _earlier_high_water_step(self) -> int:
        """The furthest step any earlier session reported, to count steps recomputed now."""
        if self.store is None:
            return 0
        try:
            return max((s.get("last_step") or 0 for s in history.read_sessions(self.store)), default=0)
        except Exception as exc:  # history is best effort; never block a start on it
            log.warning("history_unreadable", error=str(exc))
            return 0

    # --- updates from the supervisor loop ---

    def _update(self, urgent: bool = False, **fields: Any) -> None:
        with self._lock:
            self.record.update(fields)
            self.record["updated_at"] = time.time()
            self._dirty = True
        if urgent:
            self._urgent.set()

    def trainer_started(self, message: dict[str, Any]) -> None:
        resumed = message.get("resumed_from_step")
        with self._lock:
            self._active = True
            lost = max(0, self.high_water_step - resumed) if resumed is not None else max(0, self.high_water_step)
            self.record["lost_steps"] += lost
            self.record["trainer_starts"].append(
                {"time": message.get("time", time.time()), "resumed_from_step": resumed, "first_step_at": None})
        self._update(urgent=True, total_steps=message.get("total_steps"), last_step=message.get("step", 0),
                     epoch=message.get("epoch", 0))

    def first_step(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self.record["trainer_starts"]:
                self.record["trainer_starts"][-1]["first_step_at"] = message.get("time", time.time())
        self._update()

    def progress(self, message: dict[str, Any]) -> None:
        step = message.get("step", 0)
        self.high_water_step = max(self.high_water_step, step)
        fields = {"last_step": step}
        if "epoch" in message:
            fields["epoch"] = message["epoch"]
        now = time.time()
        if message.get("img_per_s") and now - self._last_throughput >= THROUGHPUT_EVERY:
            self._last_throughput = now
            with self._lock:
                samples = self.record["throughput"]
                samples.append({"time": now, "step": step, "img_per_s": message["img_per_s"]})
                del samples[:-history.MAX_THROUGHPUT_ENTRIES]
        self._update(**fields)

    def checkpoint(self, message: dict[str, Any]) -> None:
        entry = {key: message.get(key) for key in ("time", "step", "reason", "bytes", "seconds",
                                                   "snapshot_seconds", "store")}
        with self._lock:
            self.record["checkpoints"].append(entry)
            del self.record["checkpoints"][:-history.MAX_CHECKPOINT_ENTRIES]
        self._update(urgent=message.get("reason") != "periodic")

    def metrics(self, message: dict[str, Any]) -> None:
        entry = {key: message.get(key) for key in ("time", "step", "epoch", "train_loss", "test_loss",
                                                   "test_accuracy")}
        with self._lock:
            self.record["metrics"].append(entry)
        self._update()

    def notice(self, source: str, when: float) -> None:
        with self._lock:
            self.record["notices"].append({"time": when, "source": source})
        self._update(urgent=True)

    def end(self, reason: str, code: int) -> None:
        if reason == "stopped":
            sources = {notice["source"] for notice in self.record["notices"]}
            reason = "preemption" if sources & set(PREEMPTION_SOURCES) else "signal"
        self._update(urgent=True, state="ended", ended_at=time.time(), end_reason=reason, exit_code=code)

    # --- writing ---

    def flush_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_flush >= FLUSH_EVERY:
            self._urgent.set()

    def _write_loop(self) -> None:
        while True:
            self._urgent.wait(timeout=FLUSH_EVERY)
            self._urgent.clear()
            self._write_once()
            if self._closed:
                self._written.set()
                return

    def _write_once(self) -> None:
        with self._lock:
            if not (self._dirty and self._active and self.store is not None):
                return
            data = history.encode(self.record)
            self._dirty = False
        self._last_flush = time.monotonic()
        try:
            self.store.put(self.key, data, deadline=10.0)
        except Exception as exc:  # the run goes on; the next flush retries
            with self._lock:
                self._dirty = True
            log.warning("session_record_write_failed", error=str(exc))

    def close(self, deadline: float) -> None:
        """Write the final record, waiting at most `deadline` seconds."""
        self._closed = True
        self._urgent.set()
        self._written.wait(timeout=deadline)
