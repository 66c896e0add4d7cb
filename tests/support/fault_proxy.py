"""A fault-injecting HTTP reverse proxy on 127.0.0.1, for putting a misbehaving network in front of a server.

    proxy = FaultProxy("http://127.0.0.1:4443")   # upstream, e.g. the GCS emulator
    proxy.start()                                  # proxy.endpoint == "http://127.0.0.1:<port>"
    proxy.fail_next(3, status=503)                 # the next 3 requests get 503 (not forwarded)
    proxy.fail_for(30, status=429)                 # every request for 30 s gets 429
    proxy.go_down(); ...; proxy.go_up()            # 503 (or connection resets) until told otherwise
    proxy.answer_all(403)                          # a store the user may not read, until clear()
    proxy.delay(5, count=1)                        # hold the next response 5 s
    proxy.reset_next(1, when="mid_upload")         # cut the connection halfway through a request body
    proxy.reset_next(1, when="after_forward")      # forward it, then drop the success reply (lost ack)
    proxy.truncate_next(1, keep=0.5)               # serve half of the next download body (torn read)
    proxy.counts["PUT"], proxy.forwarded["POST"]   # requests received / passed upstream, by method
    proxy.clear()                                  # remove every fault; counts are kept
    proxy.close()

Every fault control takes `methods=("GET", ...)` to restrict it to some HTTP methods.
Faults are checked in this order: down, answer_all, fail_for, fail_next, reset_next,
then (for forwarded requests) delay and truncate_next. Location headers of the upstream
(resumable upload sessions) are rewritten to point at the proxy, so every chunk passes
through it. The proxy is bounded: request bodies up to MAX_BODY bytes, socket timeouts,
at most MAX_CONNECTIONS concurrent connections, and delays end early on clear()/close().
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import urlsplit

MAX_BODY = 512 * 1024 * 1024
MAX_CONNECTIONS = 64
SOCKET_TIMEOUT = 60.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length", "host"}


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods else None


class _Rule:
    """One armed fault: how many requests it still applies to (None: unlimited), until when, to which methods."""

    def __init__(self, count: int | None, methods: Iterable[str] | None, until: float | None = None, **params):
        self.count = count
        self.methods = _methods(methods)
        self.until = until
        self.params = params

    def matches(self, method: str, now: float) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.until is not None and now >= self.until:
            return False
        return self.count is None or self.count > 0

    def consume(self) -> None:
        if self.count is not None:
            self.count -= 1


class FaultProxy:
    """A reverse proxy to `upstream` ("http://host:port") that injects faults on command; see the module docstring."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""
        self.counts: Counter[str] = Counter()
        """Requests received, by HTTP method (faulted ones included)."""
        self.forwarded: Counter[str] = Counter()
        """Requests passed to the upstream, by HTTP method."""
        self.log: list[tuple[str, str, int | str]] = []
        """(method, path, status or fault name) of every request, oldest first (last 10,000)."""
        self.bucket_url = ""
        """Set by the `fault_proxy` fixture: the gs:// URL of the bucket made for the test."""
        self.clear()

    # -- controls -----------------------------------------------------------------------

    def clear(self) -> None:
        """Remove every fault (ends running delays early); the counters are kept."""
        with self._lock:
            self._down: str | None = None
            self._answer_all: tuple[int, frozenset[str] | None] | None = None
            self._fail: list[_Rule] = []
            self._resets: list[_Rule] = []
            self._delays: list[_Rule] = []
            self._truncations: list[_Rule] = []
        self._wake.set()
        self._wake = threading.Event()

    def fail_next(self, n: int, status: int = 503, methods: Iterable[str] | None = None) -> None:
        """Answer the next `n` matching requests with `status` (503, 429, ...) without forwarding them."""
        with self._lock:
            self._fail.append(_Rule(n, methods, status=status))

    def fail_for(self, seconds: float, status: int = 503, methods: Iterable[str] | None = None) -> None:
        """Answer every matching request with `status` for the next `seconds`."""
        with self._lock:
            self._fail.append(_Rule(None, methods, until=time.monotonic() + seconds, status=status))

    def go_down(self, mode: str = "503") -> None:
        """Until go_up(): answer everything with 503 (mode "503") or reset each connection (mode "reset")."""
        if mode not in ("503", "reset"):
            raise ValueError("mode must be '503' or 'reset'")
        with self._lock:
            self._down = mode

    def go_up(self) -> None:
        """Undo go_down()."""
        with self._lock:
            self._down = None

    def answer_all(self, status: int, methods: Iterable[str] | None = None) -> None:
        """Answer every matching request with `status` (e.g. 403) until clear()."""
        with self._lock:
            self._answer_all = (status, _methods(methods))

    def reset_next(self, n: int = 1, when: str = "mid_upload", methods: Iterable[str] | None = None) -> None:
        """Reset the connection of the next `n` matching requests.

        when="mid_upload": after reading about half of the request body; upstream never sees it.
        when="before_forward": before reading anything of the body.
        when="after_forward": the request reaches upstream and succeeds; its reply is dropped.
        """
        if when not in ("mid_upload", "before_forward", "after_forward"):
            raise ValueError("when must be 'mid_upload', 'before_forward' or 'after_forward'")
        with self._lock:
            self._resets.append(_Rule(n, methods, when=when))

    def delay(self, seconds: float, count: int | None = None, methods: Iterable[str] | None = None) -> None:
        """Hold the responses of the next `count` matching requests (None: all, until clear()) `seconds` s."""
        with self._lock:
            self._delays.append(_Rule(count, methods, seconds=seconds))

    def truncate_next(self, n: int = 1, keep: float | int = 0.5, honest_length: bool = True,
                      methods: Iterable[str] | None = ("GET",)) -> None:
        """Cut the next `n` matching response bodies to `keep` bytes (int) or that fraction (float).

        honest_length=True: Content-Length says the short length (a torn object as served: only a
        checksum can tell). False: the full length is announced and the connection closes early.
        """
        with self._lock:
            self._truncations.append(_Rule(n, methods, keep=keep, honest_length=honest_length))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Listen on 127.0.0.1 (a free port) and serve in a daemon thread; returns self."""
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.request_queue_size = MAX_CONNECTIONS
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and end pending delays."""
        self.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- used by the handler ------------------------------------------------------------

    def _take(self, rules: list[_Rule], method: str) -> _Rule | None:
        now = time.monotonic()
        for rule in rules:
            if rule.matches(method, now):
                rule.consume()
                return rule
        return None

    def _decide(self, method: str) -> tuple[str, dict]:
        """What to do with a request: ("forward", {...}) or a fault, under the lock."""
        with self._lock:
            self.counts[method] += 1
            if self._down == "reset":
                return "reset", {}
            if self._down == "503":
                return "status", {"status": 503}
            if self._answer_all and (self._answer_all[1] is None or method in self._answer_all[1]):
                return "status", {"status": self._answer_all[0]}
            rule = self._take(self._fail, method)
            if rule:
                return "status", {"status": rule.params["status"]}
            rule = self._take(self._resets, method)
            if rule:
                return "reset_" + rule.params["when"], {}
            plan: dict = {}
            rule = self._take(self._delays, method)
            if rule:
                plan["delay"] = rule.params["seconds"]
            rule = self._take(self._truncations, method)
            if rule:
                plan["keep"] = rule.params["keep"]
                plan["honest_length"] = rule.params["honest_length"]
            return "forward", plan

    def _record(self, method: str, path: str, outcome: int | str) -> None:
        with self._lock:
            self.log.append((method, path, outcome))
            del self.log[:-10000]

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (its timeout, our reset) is expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, socket.timeout)):
            super().handle_error(request, client_address)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def setup(self) -> None:
        if not self.owner._slots.acquire(timeout=SOCKET_TIMEOUT):
            raise ConnectionError("fault proxy: too many connections")
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._slots.release()

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _read_body(self, limit: int | None = None) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                if len(body) + size > MAX_BODY:
                    raise ValueError("request body too large")
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length if limit is None else min(limit, length))

    def _drop(self, outcome: str) -> None:
        self.owner._record(self.command, self.path, outcome)
        _reset(self.connection)
        self.close_connection = True

    def _send_status(self, status: int) -> None:
        body = json.dumps({"error": {"code": status, "message": f"fault proxy: {status}",
                                     "errors": [{"message": f"fault proxy: {status}", "reason": "injected"}]}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.owner._record(self.command, self.path, status)

    def _handle(self) -> None:
        owner = self.owner
        method = self.command
        action, plan = owner._decide(method)
        if action == "reset" or action == "reset_before_forward":
            self._drop(action)
            return
        if action == "reset_mid_upload":
            length = int(self.headers.get("Content-Length") or 0)
            self._read_body(limit=max(1, length // 2))
            self._drop(action)
            return
        body = self._read_body()
        if action == "status":
            self._send_status(plan["status"])
            return

        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = f"{owner._upstream_host}:{owner._upstream_port}"
        upstream = http.client.HTTPConnection(owner._upstream_host, owner._upstream_port, timeout=SOCKET_TIMEOUT)
        try:
            upstream.request(method, self.path, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                             headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            status, reason, reply_headers = response.status, response.reason, response.getheaders()
        except OSError as exc:
            upstream.close()
            owner._record(method, self.path, f"upstream_error:{exc}")
            self._send_status(502)
            return
        upstream.close()
        with owner._lock:
            owner.forwarded[method] += 1

        if action == "reset_after_forward":
            self._drop(action)
            return
        if "delay" in plan:
            owner._sleep(plan["delay"])

        announced = len(payload)
        if "keep" in plan:
            keep = plan["keep"]
            cut = int(len(payload) * keep) if isinstance(keep, float) else int(keep)
            payload = payload[:max(0, min(cut, len(payload) - 1))]
            if plan["honest_length"]:
                announced = len(payload)

        self.send_response(status, reason)
        for name, value in reply_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == "location":
                value = value.replace(owner.upstream, owner.endpoint)
            self.send_header(name, value)
        self.send_header("Content-Length", str(announced))
        if announced != len(payload):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
        owner._record(method, self.path, status if "keep" not in plan else f"truncated:{status}")
