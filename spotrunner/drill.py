"""A local GCE metadata server for preemption drills and tests (`spotrunner simulate-metadata`).

It answers the endpoints spotrunner and google-auth read, under
`http://127.0.0.1:PORT/computeMetadata/v1/`, with `Metadata-Flavor: Google` checked on
requests (403 without it) and sent on answers, ETags, and real long-polls
(`?wait_for_change=true&last_etag=E&timeout_sec=S` blocks until the value changes or S
seconds pass). Operators flip it with `POST /drill/preempt`,
`POST /drill/maintenance?value=...` and `POST /drill/reset`; tests also inject faults
(503/429 spells, slow answers, garbage bodies, a missing flavor header, 404s) from
Python or with `POST /drill/faults` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

from spotrunner.errors import ConfigError
from spotrunner.logs import get_logger

log = get_logger()

PREFIX = "/computeMetadata/v1/"
PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
DEFAULT_WAIT_SEC = 60
MAX_WAIT_SEC = 300  # bound on any long-poll, whatever a client asks for
REQUEST_TIMEOUT = 30.0  # an idle or stuck client connection is closed after this
GARBAGE_BODY = "<html><body>\x00\x01 captive portal: not metadata</body></html>"

DEFAULT_INSTANCE = {
    "preempted": "FALSE",
    "maintenance-event": "NONE",
    "zone": "projects/000000000000/zones/local-drill-a",
    "machine-type": "projects/000000000000/machineTypes/drill-standard-4",
    "hostname": "spotrunner-drill.local",
    "id": "1234567890123456789",
    "name": "spotrunner-drill",
    "scheduling/provisioning-model": "SPOT",
    "scheduling/preemptible": "TRUE",
    "scheduling/on-host-maintenance": "TERMINATE",
    "scheduling/automatic-restart": "FALSE",
    "service-accounts/default/email": "spotrunner-drill@drill-project.iam.gserviceaccount.com",
    "service-accounts/default/scopes": "https://www.googleapis.com/auth/cloud-platform",
    "service-accounts/default/aliases": "default",
}
DEFAULT_PROJECT = {"project-id": "drill-project", "numeric-project-id": "000000000000"}


def _etag(value: str) -> str:
    # GCE's ETags are content hashes; so are these, so FALSE->TRUE->FALSE ends where it began.
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]


class _Faults:
    """Fault knobs; every field is read under the server's lock."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.fail_status = 503
        self.delay = 0.0
        self.garbage = False
        self.drop_flavor = False
        self.not_found: set[str] = set()

    def as_dict(self) -> dict[str, Any]:
        return {"fail_next": self.fail_next, "fail_status": self.fail_status, "delay": self.delay,
                "garbage": self.garbage, "drop_flavor": self.drop_flavor, "not_found": sorted(self.not_found)}


class MetadataServer:
    """A GCE metadata stand-in on `host:port` (0 picks a free port); start() it, stop() it.

    `attributes` become instance attributes (`instance/attributes/KEY`), `project_attributes`
    project ones; `instance` overrides or adds values under `instance/` (keys like
    "zone" or "scheduling/provisioning-model").
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, attributes: dict[str, str] | None = None,
                 instance: dict[str, str] | None = None, *, project_attributes: dict[str, str] | None = None):
        self._bind = (host, port)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._values: dict[str, str] = {}
        self._initial: dict[str, str] = {}
        for key, value in DEFAULT_INSTANCE.items():
            self._initial[f"instance/{key}"] = value
        for key, value in (instance or {}).items():
            self._initial[f"instance/{key.strip('/')}"] = str(value)
        for key, value in DEFAULT_PROJECT.items():
            self._initial[f"project/{key}"] = value
        for key, value in (attributes or {}).items():
            self._initial[f"instance/attributes/{key}"] = str(value)
        for key, value in (project_attributes or {}).items():
            self._initial[f"project/attributes/{key}"] = str(value)
        self._values = dict(self._initial)
        self._faults = _Faults()
        self._counts: dict[str, int] = {}
        self._request_count = 0
        self._waiting: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> "MetadataServer":
        """Bind and serve in a daemon thread; returns self. OSError if the port is taken."""
        server = self

        class Handler(_Handler):
            metadata = server

        httpd = ThreadingHTTPServer(self._bind, Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._closing.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metadata-drill", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wakes every long-poll, closes open connections, releases the port."""
        self._closing.set()
        with self._changed:
            self._changed.notify_all()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("MetadataServer is not started")
        return self._httpd.server_address[1]

    @property
    def host_port(self) -> str:
        """"127.0.0.1:PORT", the value GCE_METADATA_HOST takes."""
        return f"{self._bind[0]}:{self.port}"

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT/computeMetadata/v1/"""
        return f"http://{self.host_port}{PREFIX}"

    @property
    def control_url(self) -> str:
        return f"http://{self.host_port}/drill"

    # -- values ---------------------------------------------------------------------

    def set_value(self, path: str, value: str | None) -> None:
        """Set (or with None remove) the value at `path` (relative to computeMetadata/v1/)."""
        path = path.strip("/")
        with self._changed:
            if value is None:
                self._values.pop(path, None)
            else:
                self._values[path] = str(value)
            self._changed.notify_all()

    def value(self, path: str) -> str | None:
        with self._lock:
            return self._values.get(path.strip("/"))

    def preempt(self) -> None:
        """instance/preempted becomes TRUE (as GCE does at the start of a preemption)."""
        self.set_value(PREEMPTED, "TRUE")
        log.info("drill_preempted")

    def set_maintenance(self, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """instance/maintenance-event becomes `value` (NONE, MIGRATE_ON_..., TERMINATE_ON_...)."""
        if value not in MAINTENANCE_VALUES:
            raise ValueError(f"maintenance value {value!r}: use one of {', '.join(MAINTENANCE_VALUES)}")
        self.set_value(MAINTENANCE, value)
        log.info("drill_maintenance_set", value=value)

    def reset(self) -> None:
        """Back to the starting values (not preempted, no maintenance) and no faults."""
        with self._changed:
            self._values = dict(self._initial)
            self._faults = _Faults()
            self._changed.notify_all()

    # -- faults ---------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` metadata requests with `status` (503 or 429 make sense).

        Long-polls already waiting get the fault too, as GCE's server does during maintenance.
        """
        with self._changed:
            self._faults.fail_next = max(0, int(count))
            self._faults.fail_status = int(status)
            self._changed.notify_all()

    def set_delay(self, seconds: float) -> None:
        """Delay every metadata answer by `seconds` (0 turns it off)."""
        with self._lock:
            self._faults.delay = max(0.0, float(seconds))

    def set_garbage(self, enabled: bool = True) -> None:
        """Answer 200 with a garbage body instead of the value."""
        with self._lock:
            self._faults.garbage = bool(enabled)

    def drop_flavor_header(self, enabled: bool = True) -> None:
        """Leave `Metadata-Flavor: Google` out of answers (as a captive proxy would)."""
        with self._lock:
            self._faults.drop_flavor = bool(enabled)

    def set_not_found(self, paths: Iterable[str]) -> None:
        """Answer 404 for these paths (relative to computeMetadata/v1/), whatever their value."""
        with self._lock:
            self._faults.not_found = {p.strip("/") for p in paths}

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = _Faults()

    def apply_faults(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Set faults from a JSON-like dict (the body of POST /drill/faults); returns them all.

        Keys: clear (bool, first), fail_next (int), fail_status (int), delay (s),
        garbage (bool), drop_flavor (bool), not_found (list of paths).
        """
        known = {"clear", "fail_next", "fail_status", "delay", "garbage", "drop_flavor", "not_found"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault keys {sorted(unknown)}; known: {sorted(known)}")
        if spec.get("clear"):
            self.clear_faults()
        if "fail_next" in spec:
            self.fail_next(int(spec["fail_next"]), int(spec.get("fail_status", 503)))
        elif "fail_status" in spec:
            with self._lock:
                self._faults.fail_status = int(spec["fail_status"])
        if "delay" in spec:
            self.set_delay(float(spec["delay"]))
        if "garbage" in spec:
            self.set_garbage(bool(spec["garbage"]))
        if "drop_flavor" in spec:
            self.drop_flavor_header(bool(spec["drop_flavor"]))
        if "not_found" in spec:
            paths = spec["not_found"]
            if isinstance(paths, str):
                paths = [paths]
            self.set_not_found(paths)
        return self.faults

    @property
    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.as_dict()

    # -- counters -------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Metadata requests received so far (control endpoints not counted)."""
        with self._lock:
            return self._request_count

    def requests_for(self, path: str) -> int:
        """Metadata requests received for `path` (relative to computeMetadata/v1/)."""
        with self._lock:
            return self._counts.get(path.strip("/"), 0)

    def long_polls_waiting(self, path: str | None = None) -> int:
        """Long-polls being held right now, for `path` or in all."""
        with self._lock:
            if path is None:
                return sum(self._waiting.values())
            return self._waiting.get(path.strip("/"), 0)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"preempted": self._values.get(PREEMPTED), "maintenance_event": self._values.get(MAINTENANCE),
                    "faults": self._faults.as_dict(), "request_count": self._request_count}

    # -- used by the handler --------------------------------------------------------

    def _count(self, path: str) -> None:
        with self._lock:
            self._request_count += 1
            self._counts[path] = self._counts.get(path, 0) + 1

    def _take_fault(self, path: str) -> tuple[int | None, float, bool, bool]:
        """(status to fail with or None, delay, garbage, drop flavor) for one request."""
        with self._lock:
            faults = self._faults
            status = None
            if faults.fail_next > 0:
                faults.fail_next -= 1
                status = faults.fail_status
            elif path in faults.not_found:
                status = 404
            return status, faults.delay, faults.garbage, faults.drop_flavor

    def _listing(self, directory: str) -> str | None:
        """Directory text like GCE's: immediate children, sub-directories ending in '/'."""
        prefix = f"{directory}/" if directory else ""
        children = set()
        for key in self._values:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                head, sep, _ = rest.partition("/")
                children.add(head + ("/" if sep else ""))
        if not children and directory:
            return None
        return "".join(f"{child}\n" for child in sorted(children))

    def _recursive(self, directory: str) -> Any:
        """JSON tree under `directory` (google-auth asks service-accounts/default/?recursive=true)."""
        prefix = f"{directory}/" if directory else ""
        tree: dict[str, Any] = {}
        for key, value in self._values.items():
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix):].split("/")
            node: Any = tree
            for part in parts[:-1]:
                node = node.setdefault(_camel(part), {}) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[_camel(parts[-1])] = value.split("\n") if parts[-1] in ("scopes", "aliases") else value
        return tree or None

    def _read(self, path: str, query: dict[str, str]) -> tuple[int, str, str, str]:
        """(status, body, content type, etag) for a metadata GET, long-polling if asked."""
        if path == "instance/service-accounts/default/token":
            body = json.dumps({"access_token": "drill-token", "expires_in": 3599, "token_type": "Bearer"})
            return 200, body, "application/json", _etag(body)
        is_dir = path == "" or path.endswith("/")
        key = path.rstrip("/")
        wait = query.get("wait_for_change", "").lower() == "true"
        recursive = query.get("recursive", "").lower() == "true"
        deadline = None
        if wait:
            try:
                timeout_sec = float(query.get("timeout_sec", DEFAULT_WAIT_SEC))
            except ValueError:
                return 400, "timeout_sec must be a number\n", "text/plain", ""
            deadline = time.monotonic() + min(max(timeout_sec, 0.0), MAX_WAIT_SEC)
        last_etag = query.get("last_etag", "NONE")
        with self._changed:
            while True:
                if is_dir:
                    if recursive:
                        tree = self._recursive(key)
                        body = None if tree is None else json.dumps(tree)
                        ctype = "application/json"
                    else:
                        body = self._listing(key)
                        ctype = "application/text"
                else:
                    body = self._values.get(key)
                    ctype = "application/text"
                if body is None:
                    return 404, "not found\n", "text/html", ""
                if deadline is not None and self._faults.fail_next > 0:
                    self._faults.fail_next -= 1
                    return self._faults.fail_status, "injected fault\n", "text/html", ""
                etag = _etag(body)
                if deadline is None or last_etag == "NONE" or etag != last_etag or self._closing.is_set():
                    return 200, body, ctype, etag
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return 200, body, ctype, etag
                self._waiting[key] = self._waiting.get(key, 0) + 1
                try:
                    self._changed.wait(remaining)
                finally:
                    self._waiting[key] -= 1


def _camel(name: str) -> str:
    head, *rest = name.split("-")
    return head + "".join(part.capitalize() for part in rest)


class _Handler(BaseHTTPRequestHandler):
    metadata: MetadataServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the requests Session expects
    timeout = REQUEST_TIMEOUT
    server_version = "Metadata Server for VM"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        with self.metadata._lock:
            self.metadata._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.metadata._lock:
                self.metadata._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the drill's own events are logged; per-request lines would drown them

    def _send(self, status: int, body: str, ctype: str = "text/plain", *, flavor: bool = True,
              etag: str = "") -> None:
        data = body.encode("utf-8")
        try:
            self.send_response(status)
            if flavor:
                self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            if etag:
                self.send_header("ETag", etag)
            if self.metadata._closing.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up mid long-poll (a supervisor exiting): nothing to answer.
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.path.startswith("/drill"):
            if parts.path.rstrip("/") == "/drill/state":
                self._send(200, json.dumps(self.metadata.state()), "application/json")
            else:
                self._send(405, "use POST for drill controls\n", flavor=False)
            return
        if parts.path.rstrip("/") == "":
            # google-auth's detection ping may hit the root; GCE answers it too.
            self._send(200, "computeMetadata/\n", "application/text")
            return
        if parts.path == PREFIX.rstrip("/"):
            parts = parts._replace(path=PREFIX)
        if not parts.path.startswith(PREFIX):
            self._send(404, "not found\n", "text/html")
            return
        if self.headers.get("Metadata-Flavor") != "Google":
            self._send(403, "Missing required header: Metadata-Flavor\n", "text/html")
            return
        path = parts.path[len(PREFIX):]
        self.metadata._count(path.rstrip("/"))
        status, delay, garbage, drop_flavor = self.metadata._take_fault(path.rstrip("/"))
        if delay:
            self.metadata._closing.wait(delay)
        if status is not None:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = "injected fault"
            self._send(status, f"{phrase}\n", "text/html", flavor=not drop_flavor)
            return
        status, body, ctype, etag = self.metadata._read(path, query)
        if garbage and status == 200:
            body, etag = GARBAGE_BODY, _etag(GARBAGE_BODY + str(time.monotonic()))
        self._send(status, body, ctype, flavor=not drop_flavor, etag=etag)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        action = parts.path.rstrip("/")
        server = self.metadata
        try:
            if action == "/drill/preempt":
                server.preempt()
            elif action == "/drill/maintenance":
                server.set_maintenance(query.get("value", "TERMINATE_ON_HOST_MAINTENANCE"))
            elif action == "/drill/reset":
                server.reset()
            elif action == "/drill/faults":
                spec = json.loads(raw.decode("utf-8") or "{}")
                if not isinstance(spec, dict):
                    raise ValueError("the body must be a JSON object")
                server.apply_faults(spec)
            else:
                self._send(404, "unknown drill action; use /drill/preempt, /drill/maintenance?value=..., "
                                "/drill/reset or /drill/faults\n", flavor=False)
                return
        except (ValueError, TypeError) as exc:
            self._send(400, f"{exc}\n", flavor=False)
            return
        self._send(200, json.dumps(server.state()) + "\n", "application/json", flavor=False)


def serve(port: int, attributes: dict[str, str]) -> int:
    """Run a MetadataServer on 127.0.0.1:`port` in the foreground until SIGINT/SIGTERM; returns 0.

    Prints the `export GCE_METADATA_HOST=...` line for the shell that runs spotrunner and
    the curl command that flips the preemption flag. ConfigError if the port is unusable.
    """
    server = MetadataServer(port=port, attributes=attributes)
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(
            f"--port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
            "choose a free port, or 0 for any"
        ) from None
    stop = threading.Event()

    def request_stop(_signum: int, _frame: Any) -> None:
        stop.set()  # only record it: the main thread does the shutdown

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"export GCE_METADATA_HOST={server.host_port}", flush=True)
        print(f"curl -X POST {server.control_url}/preempt", flush=True)
        log.info("drill_started", port=server.port, attributes=sorted(attributes))
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
        log.info("drill_stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI wiring is `spotrunner simulate-metadata`
    sys.exit(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0, {}))
