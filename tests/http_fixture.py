"""A loopback HTTP server for download tests: files served from memory on 127.0.0.1.

``server.serve(path, data, mode=...)`` publishes bytes at a path; ``server.count(path)`` says how
many requests (GET or HEAD) reached it. Modes imitate the ways a real download goes wrong:

  normal      the file, with its Content-Length
  wrong       the same Content-Length, one byte changed (fails a checksum)
  truncated   the full Content-Length, half the body, then the connection closes
  stall       the request is read, then nothing is sent (a hung server)
  stall_body  headers and half the body, then nothing more
  no_length   the file without a Content-Length, the end marked by closing the connection

Stalled answers wait until the server closes. The server closes at fixture teardown, and closes
itself after ``deadline_s`` whatever happens, so a hung test cannot keep it alive.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODES = ("normal", "wrong", "truncated", "stall", "stall_body", "no_length")


@dataclass
class Route:
    data: bytes
    mode: str = "normal"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 at a free port, started on construction."""

    def __init__(self, deadline_s: float = 60.0):
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []
        self.stopped = threading.Event()  # set when closing starts: wakes stalled answers
        self.closed = threading.Event()   # set once the port is released
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.loopback = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-http", daemon=True)
        self._thread.start()
        self._deadline = threading.Timer(deadline_s, self.close)
        self._deadline.daemon = True
        self._deadline.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def serve(self, path: str, data: bytes, *, mode: str = "normal", status: int = 200,
              headers: dict[str, str] | None = None) -> str:
        """Publish ``data`` at ``path``; returns its URL."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.routes[path] = Route(data, mode, status, dict(headers or {}))
        return self.url(path)

    def count(self, path: str) -> int:
        return self.requests[path]

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests[path] += 1
            self.log.append((method, path))

    def close(self) -> None:
        """Stop serving and release the port; idempotent, callable from any thread."""
        with self._lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
        self._deadline.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self.closed.set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._answer(with_body=True)

    def do_HEAD(self):
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        server: LoopbackServer = self.server.loopback
        path = urlsplit(self.path).path
        server.record(self.command, path)
        route = server.routes.get(path)
        if route is None:
            route = Route(b"", status=404)
        if route.mode == "stall":
            server.stopped.wait()
            self.close_connection = True
            return
        body = route.data
        if route.mode == "wrong" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if route.mode == "no_length":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not with_body:
            return
        if route.mode in ("truncated", "stall_body"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if route.mode == "stall_body":
                server.stopped.wait()
            self.close_connection = True
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (a size cap)
            self.close_connection = True
