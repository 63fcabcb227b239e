"""A TCP relay on loopback that counts, with a timestamp, every byte it forwards each way.

A benchmark puts one between each device and the SuperLink's Fleet API: the device
connects to the relay's port, the relay to the SuperLink. TLS runs end to end through it
(the relay never decrypts), so what it counts is what crossed the wire: TLS records, HTTP/2
and gRPC framing, the protobuf messages, and Flower's polling and heartbeats in between.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field

_CHUNK = 1 << 16


@dataclass
class Counts:
    """Timestamped byte counts of one relay: to the device (from the SuperLink) and from it."""

    to_device: list[tuple[float, int]] = field(default_factory=list)
    from_device: list[tuple[float, int]] = field(default_factory=list)

    def between(self, start: float, end: float) -> tuple[int, int]:
        """(bytes to the device, bytes from it) forwarded in the monotonic window (start, end]."""
        return _window(self.to_device, start, end), _window(self.from_device, start, end)


def _window(events: list[tuple[float, int]], start: float, end: float) -> int:
    # Sorted here: a device with several connections has several pumps appending to one list.
    ordered = sorted(events)
    stamps = [t for t, _ in ordered]
    return sum(n for _, n in ordered[bisect_right(stamps, start):bisect_right(stamps, end)])


class Relay:
    """Listen on 127.0.0.1:port (chosen free) and forward every connection to 127.0.0.1:target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.counts = Counts()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                device, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                device.close()
                continue
            threading.Thread(target=self._pump, args=(device, upstream, self.counts.from_device), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, device, self.counts.to_device), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, events: list[tuple[float, int]]) -> None:
        try:
            while chunk := source.recv(_CHUNK):
                events.append((time.monotonic(), len(chunk)))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):  # one side closed: close both, the other pump ends too
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._server.close()

