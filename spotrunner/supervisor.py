"""The supervisor behind `spotrunner run`: one loop that owns every decision.

It starts the trainer as a child process and then waits on a single event queue. Signal
handlers, the notice watcher thread, the trainer's status reports and the trainer's exit
all arrive there as events; `run()` dispatches each to a `handle_*` method, and a tick
each second checks the timers (stop deadline, restart backoff, hang detection, watchdog).
State changes happen in `_set_state` only, which logs every transition:

    STARTING --trainer reports training--> RUNNING --notice/signal--> DRAINING
    DRAINING --trainer exits--> STOPPED          (75 when it committed its checkpoint)
    DRAINING --deadline passes--> STOPPING --SIGKILL, trainer exits--> STOPPED
    RUNNING  --trainer dies--> STARTING again after a backoff, a bounded number of times

The supervisor does not import torch: it must react to a preemption within milliseconds
even while the trainer is busy, and it must stay small enough to read in one sitting.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from spotrunner import exitcodes
from spotrunner.config import Config
from spotrunner.logs import get_logger
from spotrunner.notices import Notice, NoticeWatcher
from spotrunner.sdnotify import SystemdNotifier
from spotrunner.session import SessionRecorder
from spotrunner.trainer import CONFIG_ENV, PARENT_ENV, SESSION_ENV, STATUS_SOCKET_ENV

log = get_logger()

TICK_SECONDS = 0.5
MAINTENANCE_LEAD_SECONDS = 60.0  # GCE announces host maintenance about a minute ahead
ESCALATION_GRACE = 2.0  # seconds between SIGTERM and SIGKILL once the stop deadline has passed
STATUS_EVERY = 5.0  # seconds between sd_notify STATUS updates


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class NoticeReceived:
    notice: Notice


@dataclass(frozen=True)
class TrainerReported:
    message: dict[str, Any]


@dataclass(frozen=True)
class TrainerExited:
    pid: int
    code: int


_SIGNAL_SOURCES = {signal.SIGTERM: "sigterm", signal.SIGINT: "sigint", signal.SIGHUP: "sighup"}


class Supervisor:
    def __init__(self, cfg: Config, *, session: SessionRecorder, watcher_sources: list[Any],
                 notifier: SystemdNotifier | None = None):
        self.cfg = cfg
        self.session = session
        self.notifier = notifier or SystemdNotifier.from_env()
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.watcher = NoticeWatcher(watcher_sources, self._on_notice) if watcher_sources else None
        self.state = State.STARTING
        self.exit_code: int | None = None
        self.trainer: subprocess.Popen | None = None
        self.trainer_pids: set[int] = set()  # processes that installed their handlers (said hello)
        self.pending_signal: int | None = None
        self.reported_exit: int | None = None
        self.stopped_cleanly = False
        self.stop_source: str | None = None
        self.stop_deadline: float | None = None
        self.kill_at: float | None = None
        self.drain_at: float | None = None  # with a long notice: when to stop training
        self.restart_at: float | None = None
        self.restarts: deque[float] = deque()
        self.last_progress: float | None = None
        self.last_status_at = 0.0
        self.last_watchdog_at = 0.0
        self.hung = False
        self.status_socket_name = f"spotrunner-{os.getpid()}-{secrets.token_hex(4)}"
        self._status_sock: socket.socket | None = None

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until the run completes, stops or fails; returns the exit code."""
        self._install_signal_handlers()
        self._open_status_socket()
        if self.watcher:
            self.watcher.start()
        self._start_trainer()
        try:
            while self.state is not State.STOPPED:
                try:
                    event = self.events.get(timeout=TICK_SECONDS)
                except queue.Empty:
                    event = None
                if isinstance(event, SignalReceived):
                    self.handle_signal(event.signum)
                elif isinstance(event, NoticeReceived):
                    self.handle_notice(event.notice)
                elif isinstance(event, TrainerReported):
                    self.handle_report(event.message)
                elif isinstance(event, TrainerExited):
                    self.handle_trainer_exit(event.pid, event.code)
                self.handle_tick(time.monotonic())
        finally:
            self._shutdown()
        assert self.exit_code is not None
        return self.exit_code

    def _set_state(self, new: State, **why: Any) -> None:
        if new is self.state:
            return
        log.info("supervisor_state_changed", state=new.value, previous=self.state.value, **why)
        self.state = new

    def _finish(self, code: int, reason: str) -> None:
        self.exit_code = code
        self.session.end(reason, code)
        self._set_state(State.STOPPED, code=code, reason=reason)

    # --- event sources (threads and handlers: they only enqueue) --------------------------

    def _install_signal_handlers(self) -> None:
        for signum in _SIGNAL_SOURCES:
            signal.signal(signum, lambda signum, _frame: self.events.put(SignalReceived(signum)))

    def _on_notice(self, notice: Notice) -> None:
        self.events.put(NoticeReceived(notice))

    def _open_status_socket(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + self.status_socket_name)  # abstract: nothing to clean up on disk
        sock.settimeout(0.5)
        self._status_sock = sock

        def read() -> None:
            while self._status_sock is not None:
                try:
                    payload = sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                try:
                    message = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    self.events.put(TrainerReported(message))

        threading.Thread(target=read, name="trainer-status", daemon=True).start()

    def _start_trainer(self) -> None:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        env[CONFIG_ENV] = self.cfg.to_json()
        env[STATUS_SOCKET_ENV] = "@" + self.status_socket_name
        env[SESSION_ENV] = self.session.session_id
        env[PARENT_ENV] = str(os.getpid())
        if self.cfg.world_size > 1 and "OMP_NUM_THREADS" not in env:
            # torchrun would set 1 and say so; share the cores between this node's processes.
            env["OMP_NUM_THREADS"] = str(self.cfg.threads or max(1, (os.cpu_count() or 1) // self.cfg.nproc_per_node))
        self.trainer_pids.clear()
        self.stopped_cleanly = False
        self.reported_exit = None
        self.last_progress = None
        self.hung = False
        trainer = subprocess.Popen(trainer_command(self.cfg), env=env)
        self.trainer = trainer
        log.info("worker_started", pid=trainer.pid, world_size=self.cfg.nproc_per_node)

        def wait() -> None:
            self.events.put(TrainerExited(trainer.pid, trainer.wait()))

        threading.Thread(target=wait, name="trainer-wait", daemon=True).start()

    # --- handlers -----------------------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        source = _SIGNAL_SOURCES.get(signum, f"signal {signum}")
        if self.state in (State.DRAINING, State.STOPPING):
            if signum == signal.SIGINT and self.stop_source == "sigint":
                log.warning("abort_requested", hint="second SIGINT: killing the trainer without a checkpoint")
                self._kill_trainer()
                self._finish(exitcodes.ABORTED, "aborted")
            return  # a second notice while draining changes nothing
        log.warning("preemption_notice", source=source)
        self.session.notice(source, time.time())
        self.begin_drain(source, signal.SIGTERM)

    def handle_notice(self, notice: Notice) -> None:
        self.session.notice(notice.source, notice.time)
        if self.state in (State.DRAINING, State.STOPPING, State.STOPPED) or self.drain_at is not None:
            return  # already acting on an earlier notice
        lead = MAINTENANCE_LEAD_SECONDS if notice.source == "maintenance" else self.cfg.preemption_notice_seconds
        usable = lead - self.cfg.stop_deadline - ESCALATION_GRACE
        log.warning("preemption_notice", source=notice.source, detail=notice.detail,
                    train_on_seconds=round(max(0.0, usable), 1))
        if usable > 1.0:
            # A long notice: make the run safe now, then keep training until the last safe moment.
            self.stop_source = notice.source
            self.drain_at = time.monotonic() + usable
            self._signal_trainer(signal.SIGUSR2)
            return
        self.begin_drain(notice.source, signal.SIGUSR1)

    def begin_drain(self, source: str, trainer_signal: int) -> None:
        """Tell the trainer to checkpoint and stop, and start the stop deadline."""
        self.stop_source = source
        self.notifier.stopping()
        self.notifier.extend_timeout(self.cfg.stop_deadline + 5)
        if self.trainer is None or self.trainer.poll() is not None:
            # No trainer running (between restarts): the last committed checkpoint stands.
            self._finish(exitcodes.STOPPED, "stopped")
            return
        self._set_state(State.DRAINING, source=source)
        self.stop_deadline = time.monotonic() + self.cfg.stop_deadline
        self._signal_trainer(trainer_signal)

    def handle_report(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self.trainer is None:
            return
        if kind == "hello":
            self.trainer_pids.add(int(message["pid"]))
            if self.pending_signal is not None:
                self._signal_trainer(self.pending_signal)
        elif kind == "started":
            self.last_progress = time.monotonic()
            self.session.trainer_started(message)
            if self.state is State.STARTING:
                self._set_state(State.RUNNING, step=message.get("step"))
                self.notifier.ready()
        elif kind == "first_step":
            self.session.first_step(message)
        elif kind == "progress":
            self.last_progress = time.monotonic()
            self.session.progress(message)
            if time.monotonic() - self.last_status_at >= STATUS_EVERY:
                self.last_status_at = time.monotonic()
                self.notifier.status(
                    f"epoch {message.get('epoch', 0) + 1}/{self.cfg.epochs} step {message.get('step')}/"
                    f"{message.get('total_steps')} loss {message.get('loss')} {message.get('img_per_s')} img/s"
                )
        elif kind == "checkpoint":
            self.session.checkpoint(message)
            if self.state in (State.DRAINING, State.STOPPING) and message.get("reason") in ("preemption", "signal"):
                # The stop's checkpoint is committed: even a trainer killed after this point
                # (a slow exit past the deadline) stopped safely.
                self.stopped_cleanly = True
        elif kind == "metrics":
            self.session.metrics(message)
        elif kind == "stopped":
            self.stopped_cleanly = True
            self.session.progress(message)
        elif kind == "completed":
            self.session.progress(message)
        elif kind == "exiting":
            self.reported_exit = int(message.get("code", exitcodes.FAILURE))

    def handle_trainer_exit(self, pid: int, code: int) -> None:
        if self.trainer is None or pid != self.trainer.pid:
            return
        # Under torchrun the launcher's own code hides the trainer's; prefer what rank 0 said.
        if self.reported_exit is not None and code not in (exitcodes.OK, exitcodes.STOPPED):
            code = self.reported_exit
        log.info("worker_exited", code=code, pid=pid)
        self.trainer = None
        if code == exitcodes.STOPPED or self.stopped_cleanly:
            # Stopped with a committed checkpoint. Also when we did not ask: under torchrun a
            # notice on another node stops every rank, and the job must stop here too.
            self._finish(exitcodes.STOPPED, "stopped")
            return
        if self.state in (State.DRAINING, State.STOPPING):
            if code == exitcodes.OK:
                self._finish(exitcodes.OK, "completed")
            else:
                log.error("stop_failed", code=code,
                          hint="the trainer did not commit a checkpoint in time; the next start "
                               "resumes from the last committed one")
                self._finish(exitcodes.FAILURE, "failed")
            return
        if code == exitcodes.OK:
            self._finish(exitcodes.OK, "completed")
        elif code == exitcodes.CONFIG:
            self._finish(exitcodes.CONFIG, "config_error")
        elif code == exitcodes.FENCED:
            self._finish(exitcodes.FENCED, "fenced")
        else:
            self._schedule_restart(code)

    def handle_tick(self, now: float) -> None:
        if self.notifier.watchdog_interval and now - self.last_watchdog_at >= self.notifier.watchdog_interval:
            self.last_watchdog_at = now
            self.notifier.watchdog()
        if self.state is State.DRAINING and self.stop_deadline is not None and now >= self.stop_deadline:
            log.error("stop_deadline_passed", seconds=self.cfg.stop_deadline,
                      hint="terminating the trainer; raise --stop-deadline only if the VM's window allows")
            self._set_state(State.STOPPING)
            self._signal_trainer(signal.SIGTERM)
            self.kill_at = now + ESCALATION_GRACE
        if self.state is State.STOPPING and self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self._kill_trainer()
        if self.drain_at is not None and now >= self.drain_at and self.state is State.RUNNING:
            self.begin_drain(self.stop_source or "metadata", signal.SIGUSR1)
        if self.restart_at is not None and now >= self.restart_at and self.state is State.STARTING:
            self.restart_at = None
            self._start_trainer()
        if (self.state is State.RUNNING and self.trainer is not None and self.last_progress is not None
                and now - self.last_progress > self.cfg.hang_timeout and not self.hung):
            self.hung = True
            log.error("worker_hung", seconds=round(now - self.last_progress, 1),
                      hint="no progress within --hang-timeout; killing and restarting it")
            self._kill_trainer()
        self.session.flush_if_due()

    # --- helpers ------------------------------------------------------------------------

    def _schedule_restart(self, code: int) -> None:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.cfg.restart_window:
            self.restarts.popleft()
        if len(self.restarts) >= self.cfg.max_restarts:
            log.error("worker_failed_permanently", code=code, restarts=len(self.restarts),
                      window_seconds=self.cfg.restart_window,
                      hint="see the trainer's error above; fix it and start again")
            self._finish(exitcodes.FAILURE, "failed")
            return
        self.restarts.append(now)
        delay = min(60.0, 2.0 ** (len(self.restarts) - 1))
        log.warning("worker_restart_scheduled", code=code, in_seconds=delay, attempt=len(self.restarts),
                    max_restarts=self.cfg.max_restarts)
        self._set_state(State.STARTING, reason="trainer exited unexpectedly")
        self.restart_at = now + delay

    def _signal_trainer(self, signum: int) -> None:
        """Send `signum` to every trainer process that is ready for it; queue it otherwise."""
        if self.trainer is None:
            return
        if not self.trainer_pids:
            # The trainer has not installed its handlers yet; a signal now would kill it.
            self.pending_signal = signum
            return
        self.pending_signal = None
        for pid in self.trainer_pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _kill_trainer(self) -> None:
        if self.trainer is None:
            return
        for pid in self.trainer_pids | {self.trainer.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _shutdown(self) -> None:
        if self.watcher:
            self.watcher.stop()
        if self.trainer is not None and self.trainer.poll() is None:
            self._kill_trainer()
            try:
                self.trainer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        sock, self._status_sock = self._status_sock, None
        if sock is not None:
            sock.close()
        self.session.close(deadline=3.0)


def trainer_command(cfg: Config) -> list[str]:
    """The trainer's command line: the worker module, under torchrun when there are several."""
    if cfg.world_size == 1:
        return [sys.executable, "-m", "spotrunner.trainer"]
    return [
        sys.executable, "-m", "spotrunner.orphan_guard",
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={cfg.nproc_per_node}", f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}",
        f"--master-addr={cfg.master_addr}", f"--master-port={cfg.master_port}",
        "--max-restarts=0", "-m", "spotrunner.trainer",
    ]
