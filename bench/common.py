"""Shared benchmark helpers: `spotrunner run` subprocesses with timed log events, servers, machine facts, JSON.

Benchmarks print figures; they are not tests. Everything here talks to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GCS_PROJECT = "spotrunner-bench"


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to (the message says what and shows the output)."""


# --- spotrunner subprocesses ---------------------------------------------------------------


class Run:
    """A `python -m spotrunner run ...` subprocess in its own process group.

    Every JSON log line is kept with `_rx` (time.monotonic() when this process read it);
    `spawned_mono` / `spawned_unix` mark the Popen call and `exited_mono` the exit, taken by
    a thread blocked in wait(), so latencies are not quantised by polling.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["SPOTRUNNER_LOG_FORMAT"] = "json"
        full_env.update(env or {})
        self.args = args
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.exited_mono: float | None = None
        self.returncode: int | None = None
        self.spawned_unix = time.time()
        self.spawned_mono = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "spotrunner", "run", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                self.lines.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    record["_rx"] = now
                    self.events.append(record)
                self._changed.notify_all()

    def _wait(self) -> None:
        code = self.proc.wait()
        with self._changed:
            self.exited_mono = time.monotonic()
            self.returncode = code
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.events if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout: float = 120, **fields: Any) -> dict[str, Any]:
        """The first `event` log record matching `fields`; BenchError on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [r for r in self.events if r.get("event") == event
                         and all(r.get(k) == v for k, v in fields.items())]
                if found:
                    return found[0]
                if self.returncode is not None:
                    self._changed.release()
                    try:
                        self._reader.join(timeout=5)
                    finally:
                        self._changed.acquire()
                    found = [r for r in self.events if r.get("event") == event
                             and all(r.get(k) == v for k, v in fields.items())]
                    if found:
                        return found[0]
                    raise BenchError(f"spotrunner exited {self.returncode} before {event} {fields}:\n"
                                     f"{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {event} {fields} within {timeout:.0f} s:\n{self.output()}")
                self._changed.wait(timeout=min(left, 1.0))

    def wait_exit(self, timeout: float = 120) -> int:
        """The exit code; the group is killed and BenchError raised if it overruns."""
        self._waiter.join(timeout=timeout)
        if self.returncode is None:
            self.kill_group()
            raise BenchError(f"spotrunner did not exit within {timeout:.0f} s:\n{self.output()}")
        self._reader.join(timeout=10)
        return self.returncode

    def run_for(self, seconds: float) -> None:
        """Let the run go on for `seconds` (less if it exits first)."""
        self._waiter.join(timeout=seconds)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (supervisor and trainer) and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._waiter.join(timeout=10)

    def output(self, lines: int = 40) -> str:
        with self._lock:
            return "\n".join(line[:400] for line in self.lines[-lines:])


def iso_to_unix(text: str) -> float:
    """Unix seconds of a log record's ISO `time` ("2026-01-01T00:00:00.123Z")."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_args(store: str, run_id: str, **settings: Any) -> list[str]:
    """`spotrunner run` flags for a synthetic run; `settings` are flag names with _ for -."""
    args = ["--store", store, "--run-id", run_id, "--dataset", "synthetic"]
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@contextmanager
def cleanup(*runs: Run) -> Iterator[list[Run]]:
    """A list to append Runs to; every one still alive is killed on the way out."""
    started = list(runs)
    try:
        yield started
    finally:
        for run in started:
            if run.returncode is None:
                run.kill_group()


# --- servers ---------------------------------------------------------------------------------


def _quiet_disconnects(server: Any) -> None:
    """Drop the traceback socketserver prints when a client hangs up mid-answer.

    A supervisor that exits while its long-poll is being answered is normal here (every trial
    ends that way); the drill's handler does not catch BrokenPipeError itself (see bench/README.md).
    """
    httpd = getattr(server, "_httpd", None)
    if httpd is None:
        return
    default = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        default(request, client_address)

    httpd.handle_error = handle_error


@contextmanager
def metadata_drill() -> Iterator[Any]:
    """A started spotrunner.drill.MetadataServer; GCE_METADATA_HOST set for child processes."""
    import logging

    from spotrunner.drill import MetadataServer
    from spotrunner.logs import configure

    # The drill logs each flip; keep this process's stdout for the JSON result.
    configure("bench", log_format="json", level=logging.WARNING, stream=sys.stderr)
    server = MetadataServer().start()
    _quiet_disconnects(server)
    saved = {k: os.environ.get(k) for k in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT")}
    os.environ["GCE_METADATA_HOST"] = server.host_port
    os.environ.pop("GCE_METADATA_ROOT", None)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """fake-gcs-server (memory backend) on 127.0.0.1 with a fresh bucket; yields its gs:// URL.

    Started the way the tests start it (tests/support/gcs.py); STORAGE_EMULATOR_HOST and
    GOOGLE_CLOUD_PROJECT point child processes at it while it runs.
    """
    from tests.support.gcs import running_emulator

    with running_emulator() as emulator, environment(emulator.env()):
        yield emulator.new_bucket()


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with `variables` set for the duration; restored as it was afterwards."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- figures -----------------------------------------------------------------------------------


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    """n, median, mean, min, max of `values` (rounded); empty values give n=0 only."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "mean": round(statistics.fmean(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, torch and Python versions, GPU if any, and the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                    break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": memory_gib,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        facts["torch"] = None
    return facts


def emit(result: dict[str, Any]) -> None:
    """Print a benchmark's result as indented JSON on stdout."""
    print(json.dumps(result, indent=2, sort_keys=False, default=str), flush=True)


def parse_quick(argv: list[str] | None = None) -> bool:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer trials and shorter runs")
    return parser.parse_args(argv).quick
