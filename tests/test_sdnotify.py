"""sd_notify messages received on a real datagram socket bound by the test."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

import pytest

from spotrunner.sdnotify import SystemdNotifier


@pytest.fixture
def notify_socket():
    """(NOTIFY_SOCKET value, receiving socket) for a filesystem socket; short path (108-byte limit)."""
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_on_a_path_socket(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert receive(sock) == "READY=1"
    assert notifier.status("training step 10/100")
    assert receive(sock) == "STATUS=training step 10/100"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.extend_timeout(2.5)
    assert receive(sock) == "EXTEND_TIMEOUT_USEC=2500000"
    assert notifier.stopping()
    assert receive(sock) == "STOPPING=1"
    assert notifier.ready(status="resumed\nat step 5")
    assert receive(sock) == "READY=1\nSTATUS=resumed at step 5"  # a newline cannot smuggle a field
    notifier.close()


def test_messages_arrive_on_an_abstract_socket():
    name = f"spotrunner-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(sock) == "READY=1"
        assert notifier.status("draining")
        assert receive(sock) == "STATUS=draining"


def test_without_notify_socket_everything_is_a_no_op():
    notifier = SystemdNotifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.extend_timeout(10) is False


def test_a_dead_socket_never_raises(tmp_path):
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "/tmp/spotrunner-no-such-dir/notify"})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("still fine") is False  # second failure: logged quietly, still no raise


def test_unsupported_address_disables_notifications():
    assert not SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_watchdog_interval(notify_socket):
    path, _ = notify_socket
    pid = str(os.getpid())
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": pid}).watchdog_interval == 2.0
    # Meant for another process (our parent): not ours to ping.
    assert SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert SystemdNotifier.from_env({"WATCHDOG_USEC": "4000000"}).watchdog_interval is None


def test_unset_environment_hides_the_socket_from_children(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = SystemdNotifier.from_env(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert notifier.ready()
    assert receive(sock) == "READY=1"
