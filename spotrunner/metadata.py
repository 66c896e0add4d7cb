"""GCE metadata server client: paths, the Metadata-Flavor header, timeouts and retries.

"No value" is a value here (None for a 404), never an exception; an answer that cannot
be trusted (transport error, 5xx, 429, a reply without `Metadata-Flavor: Google`) raises
MetadataError so callers can retry it and never mistake it for a fact. The host comes
from `GCE_METADATA_HOST` like google-auth's, so tests and drills point it at 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import socket
import threading
import time
import weakref
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from spotrunner.errors import SpotrunnerError
from spotrunner.logs import get_logger

log = get_logger()

DEFAULT_HOST = "metadata.google.internal"
FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR_VALUE = "Google"
ATTRIBUTE_KEYS = ("spotrunner-store", "spotrunner-run-id", "spotrunner-config")
# Google's own agents give the client this much longer than the server-side timeout_sec.
LONG_POLL_SLACK = 10.0
NVIDIA_GPUS_DIR = "/proc/driver/nvidia/gpus"


class MetadataError(SpotrunnerError):
    """The metadata server gave no trustworthy answer (transport error, 5xx, 429, no flavor header)."""


def metadata_host(environ: Any = None) -> str:
    """The metadata host[:port] to use: $GCE_METADATA_HOST, $GCE_METADATA_ROOT, else the GCE name."""
    environ = os.environ if environ is None else environ
    host = environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT") or DEFAULT_HOST
    # google-auth takes a bare host[:port]; accept a pasted URL too rather than build http://http://.
    for scheme in ("http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme):]
    host = host.split("/", 1)[0]
    return host


def _short_name(value: str | None) -> str | None:
    """`projects/1/zones/us-central1-a` -> `us-central1-a`."""
    if not value:
        return None
    return value.strip().rstrip("/").rsplit("/", 1)[-1] or None


def local_gpus(root: str = NVIDIA_GPUS_DIR) -> list[str]:
    """Model names of the NVIDIA GPUs the driver exposes under /proc, [] when none or unknown."""
    models = []
    try:
        for info in sorted(glob.glob(os.path.join(root, "*", "information"))):
            with open(info, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key.strip() == "Model":
                        models.append(value.strip())
                        break
    except OSError:
        return models
    return models


class _TrackingAdapter(HTTPAdapter):
    """An HTTP adapter that remembers its sockets so a long-poll can be cut short from another thread."""

    def __init__(self, sockets: "weakref.WeakSet[socket.socket]"):
        self._sockets = sockets  # set before super().__init__, which builds the pool manager
        super().__init__(pool_connections=2, pool_maxsize=2)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        sockets = self._sockets

        class _Connection(HTTPConnection):
            def connect(self) -> None:
                super().connect()
                sockets.add(self.sock)

        class _Pool(HTTPConnectionPool):
            ConnectionCls = _Connection

        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "http": _Pool}


class MetadataClient:
    """A client for `http://$GCE_METADATA_HOST/computeMetadata/v1/`; safe to share between threads."""

    def __init__(self, host: str | None = None):
        self.host = metadata_host() if host is None else metadata_host({"GCE_METADATA_HOST": host})
        self.base_url = f"http://{self.host}/computeMetadata/v1/"
        # requests.Session is not documented as thread-safe; the watcher polls from several
        # threads, so each thread gets its own Session (and connection pool).
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"MetadataClient({self.host!r})"

    # -- transport ------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # A proxy from the environment must never see (or break) metadata requests.
            session.trust_env = False
            session.headers[FLAVOR_HEADER] = FLAVOR_VALUE
            session.mount("http://", _TrackingAdapter(self._sockets))
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every pooled connection; the client stays usable (new ones are opened)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            try:
                session.close()
            except Exception:  # pragma: no cover - closing must not raise
                pass
        self._local = threading.local()

    def abort(self) -> None:
        """Cut every open connection, so requests in flight (long-polls) fail at once with MetadataError.

        For stopping watcher threads promptly; later requests open new connections.
        """
        with self._sessions_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _request(self, path: str, timeout: float, params: dict[str, str] | None = None) -> requests.Response | None:
        """The trusted 200 response for `path`, None for a 404; MetadataError for anything else."""
        url = self.base_url + path.lstrip("/")
        try:
            response = self._session().get(
                url, params=params, timeout=timeout, allow_redirects=False,
                headers={FLAVOR_HEADER: FLAVOR_VALUE},
            )
        except requests.RequestException as exc:
            raise MetadataError(f"metadata {path}: {type(exc).__name__}: {exc}") from None
        # A reply without the flavor header is not the metadata server (a captive proxy,
        # a wrong host): its body and status mean nothing, not even a 404.
        if response.headers.get(FLAVOR_HEADER) != FLAVOR_VALUE:
            raise MetadataError(
                f"metadata {path}: HTTP {response.status_code} without '{FLAVOR_HEADER}: {FLAVOR_VALUE}'; "
                "not a metadata server"
            )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MetadataError(f"metadata {path}: HTTP {response.status_code}")
        return response

    @staticmethod
    def _text(response: requests.Response) -> str:
        return response.content.decode("utf-8", errors="replace")

    # -- reads ----------------------------------------------------------------------

    def is_available(self, timeout: float = 1.0) -> bool:
        """True when a genuine metadata server answers one quick probe (for `--metadata auto`)."""
        try:
            return self._request("", timeout=timeout) is not None
        except MetadataError:
            return False
        except Exception:  # pragma: no cover - a probe must never raise
            return False

    def get(self, path: str, timeout: float = 3.0) -> str | None:
        """The value at `path` (relative to computeMetadata/v1/), None when it is not defined (404)."""
        response = self._request(path, timeout=timeout)
        return None if response is None else self._text(response)

    def get_with_etag(self, path: str, timeout: float = 3.0) -> tuple[str | None, str]:
        """(value or None for 404, ETag) of one plain GET; ETag is "NONE" when the server sent none."""
        response = self._request(path, timeout=timeout)
        if response is None:
            return None, "NONE"
        return self._text(response), response.headers.get("ETag") or "NONE"

    def wait_for_change(self, path: str, last_etag: str, timeout_sec: int) -> tuple[str | None, str]:
        """(value, etag) once `path` differs from `last_etag`, or its current value after `timeout_sec`.

        A long-poll: the server holds the request; the client waits LONG_POLL_SLACK longer so
        a server-side timeout is an answer, not a transport error. `last_etag="NONE"` returns at once.
        """
        timeout_sec = max(1, int(timeout_sec))
        params = {"wait_for_change": "true", "last_etag": last_etag or "NONE", "timeout_sec": str(timeout_sec)}
        response = self._request(path, timeout=timeout_sec + LONG_POLL_SLACK, params=params)
        if response is None:
            return None, "NONE"
        return self._text(response), response.headers.get("ETag") or "NONE"

    def _get_retried(self, path: str, retries: int, backoff: float, timeout: float) -> str | None:
        for attempt in range(retries + 1):
            try:
                return self.get(path, timeout=timeout)
            except MetadataError as exc:
                if attempt == retries:
                    raise
                log.warning("metadata_request_retried", path=path, attempt=attempt + 1, error=str(exc))
                time.sleep(backoff * (2 ** attempt))
        return None  # pragma: no cover - the loop returns or raises

    def attributes(self, retries: int = 3, backoff: float = 0.5, timeout: float = 2.0) -> dict[str, str]:
        """spotrunner's metadata attributes that are set, instance first then project.

        Runs at startup, when the metadata server may still be settling: each read is retried
        `retries` times with doubling `backoff`; MetadataError if it still fails.
        """
        found: dict[str, str] = {}
        for key in ATTRIBUTE_KEYS:
            for scope in ("instance", "project"):
                value = self._get_retried(f"{scope}/attributes/{key}", retries, backoff, timeout)
                if value is not None:
                    found[key] = value
                    break
        return found

    def instance_facts(self, timeout: float = 1.0) -> dict[str, Any]:
        """zone, machine_type, provisioning_model (SPOT/STANDARD), hostname, gpus; None when unknown.

        Best effort for session records and reports: never raises, and gives up on the
        metadata server after its first transport failure so an absent one costs one timeout.
        """
        facts: dict[str, Any] = {
            "zone": None, "machine_type": None, "provisioning_model": None, "hostname": None, "gpus": [],
        }
        reachable = True

        def read(path: str) -> str | None:
            nonlocal reachable
            if not reachable:
                return None
            try:
                value = self.get(path, timeout=timeout)
            except MetadataError:
                reachable = False
                return None
            except Exception:  # pragma: no cover - best effort means never raising
                return None
            return value.strip() if value is not None and value.strip() else None

        try:
            facts["zone"] = _short_name(read("instance/zone"))
            facts["machine_type"] = _short_name(read("instance/machine-type"))
            model = read("instance/scheduling/provisioning-model")
            if model is not None and model.upper() in ("SPOT", "STANDARD"):
                facts["provisioning_model"] = model.upper()
            else:
                # Older VMs and legacy preemptible VMs only expose the preemptible flag.
                preemptible = read("instance/scheduling/preemptible")
                if preemptible is not None and preemptible.upper() in ("TRUE", "FALSE"):
                    facts["provisioning_model"] = "SPOT" if preemptible.upper() == "TRUE" else "STANDARD"
            facts["hostname"] = read("instance/hostname")
            facts["gpus"] = local_gpus()
        except Exception:  # pragma: no cover - best effort means never raising
            pass
        return facts
