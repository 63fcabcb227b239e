"""One running `device start` per device directory, and what its last session left behind.

Flower's SuperLink answers every failed activation with the same "[code: 2004] Failed to
activate SuperNode." (issue 16), whether the key is unknown, the device is already
connected from another process, or a previous session died without signing off (kill -9,
power loss) and is still marked online until two heartbeat intervals (2 x 30 s in Flower
1.41) pass without a heartbeat. The device can tell these apart itself:

- `DIR/supernode.lock` is held (fcntl.flock) by the running `device start`: a second one
  is refused before it dials the server;
- the same file records the session: pid, start, `alive_at` refreshed every
  ALIVE_EVERY seconds, and `stopped_at` on a clean exit. A record without `stopped_at`
  whose process is gone is an unclean stop at about `alive_at`.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedinterest.common.errors import FedinterestError

LOCK_FILE = "supernode.lock"
ALIVE_EVERY = 5.0
# Flower 1.41: a node is online until HEARTBEAT_PATIENCE (2) x HEARTBEAT_DEFAULT_INTERVAL (30 s)
# after its last heartbeat; the SuperLink tags it offline at the next request after that.
# Measured here: activation refused for up to ~80 s after a kill -9. Retry within this window.
STALE_SESSION_SECONDS = 150.0


class AlreadyRunning(FedinterestError, RuntimeError):
    """Another `device start` holds this device directory."""


@dataclass(frozen=True)
class PreviousSession:
    """What the lock file says about the session before this one."""

    pid: int | None
    alive_at: float | None
    stopped_at: float | None

    @property
    def unclean(self) -> bool:
        return self.stopped_at is None and self.alive_at is not None

    def seconds_since_alive(self, now: float | None = None) -> float | None:
        return None if self.alive_at is None else (now or time.time()) - self.alive_at


class DeviceSession:
    """The lock and session record of `device start` for one device directory (a context manager)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._handle: IO[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.previous = PreviousSession(None, None, None)
        self.record: dict = {}

    def __enter__(self) -> DeviceSession:
        handle = open(self.path, "a+", encoding="utf-8")  # never truncated before the lock is ours
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            since = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started_at']))}" if holder.get("started_at") else ""
            raise AlreadyRunning(
                f"{self.path.parent}: this device is already running (`device start`, pid {holder.get('pid', '?')}{since}); "
                "a second SuperNode with the same key would be refused by the SuperLink ('Failed to activate SuperNode'). "
                "Stop the running one first"
            ) from None
        handle.seek(0)
        old = _parse(handle.read())
        self.previous = PreviousSession(old.get("pid"), old.get("alive_at"), old.get("stopped_at"))
        self._handle = handle
        now = time.time()
        # Kept from the previous session: where it was accepted, for `device status`.
        accepted = {k: old[k] for k in ("server", "node_id", "activated_at") if k in old}
        self.record = {**accepted, "pid": os.getpid(), "started_at": now, "alive_at": now, "stopped_at": None, "supernode_pid": None}
        self._write()
        self._thread = threading.Thread(target=self._keep_alive, name="device-session-alive", daemon=True)
        self._thread.start()
        return self

    def set_server(self, server: str) -> None:
        """Record the SuperLink address this session dials."""
        self.record["server"] = server
        self._write()

    def set_activated(self, node_id: int) -> None:
        """Record that the SuperLink accepted this device (Flower's node id, as text)."""
        self.record.update(node_id=str(node_id), activated_at=time.time())
        self._write()

    def set_supernode(self, pid: int | None) -> None:
        """Record the SuperNode child's pid (for `device status`)."""
        self.record["supernode_pid"] = pid
        self._write()

    def _keep_alive(self) -> None:
        while not self._stop.wait(ALIVE_EVERY):
            self.record["alive_at"] = time.time()
            self._write()

    def _write(self) -> None:
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(self.record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=ALIVE_EVERY + 1)
        now = time.time()
        self.record.update(alive_at=now, stopped_at=now, supernode_pid=None)
        self._write()
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def running_session(root: Path) -> dict | None:
    """The record of the `device start` running for `root` now, or None (for `device status`)."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(path.read_text(encoding="utf-8")) or {"pid": None}
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


def last_session(root: Path) -> dict:
    """The lock file's record as it is (empty before the first start)."""
    path = Path(root) / LOCK_FILE
    return _parse(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _parse(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}  # a torn write: treat as no record
    return value if isinstance(value, dict) else {}
