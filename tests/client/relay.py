"""A TCP relay in front of a real service that a test can cut: `cut()` closes every connection
through it at once (what a dropped network does to a client), `block()` makes it refuse new
ones (a suite that is down) until `unblock()`. Threads only, no event loop, so it sits in front
of blocking and asyncio clients alike."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class Relay:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.accepted = 0
        """Connections relayed so far (a client that reconnected made more than one)."""
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._blocked = False
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def block(self) -> None:
        """Cuts every connection and refuses new ones (they are closed at once)."""
        self._blocked = True
        self.cut()

    def unblock(self) -> None:
        self._blocked = False

    def cut(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.cut()

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._blocked:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._open += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), name="relay-pump", daemon=True
                ).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):  # one side ended: so does the other
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
