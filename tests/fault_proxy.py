"""Faults injected for real between a client and a server: a loopback TCP proxy that cuts and
restores connections on cue, and a second "host" for the cross-host paths.

``CuttableProxy(port)`` listens on 127.0.0.1 at a free port and forwards every connection to
``127.0.0.1:port`` byte for byte. ``cut()`` resets every open connection (TCP RST) and resets
every new one at once, as a server that went away does; ``restore()`` forwards again;
``outage(seconds)`` cuts now and restores after ``seconds`` in the background. The proxy closes
at teardown and closes itself after ``deadline_s`` whatever happens, so a hung test cannot
keep it alive.

``other_host(name)`` is the environment of a process that believes it runs on another machine:
fgvc names its host by ``FGVC_HOSTNAME`` when set, so liveness checks judge that process by its
heartbeats, as they judge a process elsewhere, not by its PID.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


def other_host(name: str) -> dict[str, str]:
    return {"FGVC_HOSTNAME": name}


def _close(sock: socket.socket, reset: bool = False) -> None:
    """Close a connection: with RST (linger 0) as a vanished peer's ends, or with FIN."""
    steps = ((lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))) if reset
             else (lambda: sock.shutdown(socket.SHUT_RDWR)), sock.close)
    for step in steps:
        try:
            step()
        except OSError:
            pass


def _reset(sock: socket.socket) -> None:
    _close(sock, reset=True)


class CuttableProxy:
    def __init__(self, target_port: int, deadline_s: float = 600.0):
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = threading.Event()
        self._closed = threading.Event()
        self.cuts: list[tuple[float, float | None]] = []  # (cut at, restored at), time.monotonic()
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()
        self._deadline = threading.Timer(deadline_s, self.close)
        self._deadline.daemon = True
        self._deadline.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._cut.set()
            self.cuts.append((time.monotonic(), None))
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut.clear()
            if self.cuts and self.cuts[-1][1] is None:
                self.cuts[-1] = (self.cuts[-1][0], time.monotonic())

    def outage(self, seconds: float) -> threading.Timer:
        """Cut now; restore after `seconds` (the returned timer; `.join()` waits for it)."""
        self.cut()
        timer = threading.Timer(seconds, self.restore)
        timer.daemon = True
        timer.start()
        return timer

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._deadline.cancel()
        self.cut()
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self) -> CuttableProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._cut.is_set():
                    _reset(client)
                    _reset(upstream)
                    continue
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            for sock in (source, sink):
                _close(sock)
