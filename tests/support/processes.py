"""Running the real `spotrunner` in subprocesses: waits with deadlines, JSON log capture, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """The first truthy value of `condition()`, polled until `timeout` s; fails the test naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class SpotrunnerProcess:
    """A `python -m spotrunner ...` subprocess in its own process group, its JSON log lines collected."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env["SPOTRUNNER_LOG_FORMAT"] = "json"
        if env:
            full_env.update(env)
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spotrunner", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd or REPO,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    record.setdefault("_received", time.monotonic())
                    self.events.append(record)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [
                record for record in self.events
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items())
            ]

    def wait_event(self, event: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            found = self.find(event, **fields)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                found = self.find(event, **fields)
                if found:
                    return found[0]
                pytest.fail(f"process exited {self.proc.returncode} before {event} {fields}:\n{self.output()}")
            return None

        return wait_for(seen, timeout, f"log event {event} {fields}")

    def wait_exit(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"spotrunner {' '.join(self.args)} did not exit within {timeout} s:\n{self.output()}")
        self._reader.join(timeout=10)
        return code

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (supervisor, trainer, torchrun workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines[-80:])


def group_is_empty(pgid: int) -> bool:
    """True when no process (zombies included) is left in process group `pgid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            return False
    return True


@pytest.fixture
def spotrunner_proc():
    """Start `spotrunner` subprocesses; every group is killed and checked empty at teardown."""
    started: list[SpotrunnerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> SpotrunnerProcess:
        process = SpotrunnerProcess(args, env=env, cwd=cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill_group()
    for process in started:
        wait_for(lambda: group_is_empty(process.pid), 10, f"process group {process.pid} to be empty")
