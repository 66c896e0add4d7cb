"""systemd's sd_notify protocol without libsystemd: READY, STATUS, STOPPING, WATCHDOG, EXTEND_TIMEOUT.

Messages are datagrams on the AF_UNIX socket named by `NOTIFY_SOCKET` (a path, or an
abstract name starting with '@'). Without it every method is a no-op, so the same code
runs under systemd, in a terminal and in tests. Sending never raises: a lost status
message must not take down the daemon that systemd is supervising.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Mapping

from spotrunner.logs import get_logger

log = get_logger()


class SystemdNotifier:
    """Sends sd_notify messages to `address`; every method is a no-op when `address` is None."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False) -> "SystemdNotifier":
        """A notifier for NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID of `environ` (os.environ by default).

        `unset_environment` removes those variables from os.environ so child processes
        (the trainer) do not talk to systemd on the supervisor's behalf.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            # vsock: and relative paths are valid for systemd but not something we speak.
            log.warning("sd_notify_disabled", reason=f"unsupported NOTIFY_SOCKET {address!r}")
            address = None
        watchdog_usec = None
        raw_usec = env.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                watchdog_usec = int(raw_usec)
            except ValueError:
                log.warning("sd_watchdog_disabled", reason=f"WATCHDOG_USEC={raw_usec!r} is not a number")
            raw_pid = env.get("WATCHDOG_PID")
            # The watchdog is meant for the process whose pid systemd named, not its children.
            if raw_pid and raw_pid.strip() != str(os.getpid()):
                watchdog_usec = None
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET named a socket to talk to."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when no watchdog is set."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def _target(self) -> str:
        assert self.address is not None
        if self.address.startswith("@"):
            return "\0" + self.address[1:]
        return self.address

    def notify(self, *fields: str) -> bool:
        """Send the `KEY=VALUE` fields as one datagram; True when it was sent, never raises."""
        if not self.enabled:
            return False
        payload = "\n".join(fields).encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(payload, self._target())
                return True
            except Exception as exc:
                # Once as a warning (a misconfigured unit is worth seeing), then quietly.
                method = log.debug if self._failed_once else log.warning
                self._failed_once = True
                method("sd_notify_failed", address=self.address, error=f"{type(exc).__name__}: {exc}")
                return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (Type=notify units are started once this arrives), with an optional STATUS."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """STATUS=text, shown by `systemctl status`."""
        return self.notify(_status_field(text))

    def stopping(self) -> bool:
        """STOPPING=1: the service has begun shutting down."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive ping; send every `watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask systemd for `seconds` more before it times out a start or stop."""
        usec = max(0, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                try:
                    self._socket.close()
                finally:
                    self._socket = None


def _status_field(text: str) -> str:
    # A newline would end the field and smuggle in another assignment.
    return "STATUS=" + " ".join(str(text).splitlines())
