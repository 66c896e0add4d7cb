"""A real systemd as PID 1 in systemd-nspawn, booted from the host's own /usr on a tmpfs root.

The invocation is the one PLATFORM-NOTES.md records as working here: `-D / --volatile=yes
-b` with a private network boots in ~10 s; commands run inside through `nsenter` into
the container's PID 1; units go in /run/systemd/system. Every wait has a deadline and
`stop()` always ends the container (SIGTERM to nspawn = clean poweroff, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.support.processes import wait_for


def unavailable_reason() -> str | None:
    """Why no container can be booted here, or None when it can be tried."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install -y systemd-container util-linux)"
    if not os.path.exists("/usr/lib/systemd/systemd") and not os.path.exists("/lib/systemd/systemd"):
        return "the host has no systemd binary to boot"
    return None


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                head, tail = handle.read().rsplit(")", 1)
        except OSError:
            continue
        if int(tail.split()[1]) == pid:
            found.append((int(entry), head.split("(", 1)[1]))
    return found


class Container:
    """One booted container; `run()` executes a command in it, `stop()` powers it off."""

    def __init__(self, bind_ro: list[str]):
        self.bind_ro = bind_ro
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0
        self._log = tempfile.TemporaryFile()

    def start(self, timeout: float = 90) -> "Container":
        command = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--private-network",
                   "-D", "/", "--volatile=yes"]
        command += [f"--bind-ro={path}:{path}" for path in self.bind_ro]
        command += ["-b", "--", "systemd.firstboot=off"]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def pid1() -> int | None:
            if self.proc.poll() is not None:
                pytest.skip(f"systemd-nspawn could not boot a container here (exit {self.proc.returncode}): "
                            f"{self.output()[-500:]}")
            for pid, comm in _children(self.proc.pid):
                if comm == "systemd":
                    return pid
            return None

        self.pid1 = wait_for(pid1, timeout, "the container's systemd to start", interval=0.1)

        def booted() -> bool:
            state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, timeout, "the container to finish booting", interval=0.2)
        return self

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """`args` run inside the container as root; the completed process (output as text)."""
        assert self.pid1, "container not started"
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *args], input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"in container: {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path, input=text)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def nspawn_container():
    """Boot a container with the given read-only binds: `boot([paths])`; powered off at teardown."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: list[Container] = []

    def boot(bind_ro: list[str], timeout: float = 90) -> Container:
        container = Container(bind_ro)
        started.append(container)
        return container.start(timeout)

    yield boot
    deadline = time.monotonic() + 60
    for container in started:
        container.stop(timeout=max(5.0, deadline - time.monotonic()))
