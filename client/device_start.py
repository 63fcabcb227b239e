"""`device start`: reach the SuperLink, run the SuperNode, and say why when it is refused.

The steps, each with its own error (issue 16, items 4 and 5):
1. one `device start` per device directory (client/device_session.py);
2. the SuperLink must answer through TLS verified with the operator's CA
   (client/superlink_probe.py). Nothing answering is retried with backoff, each attempt
   naming the address and the reason, within --max-retries / --max-wait-time; a name that
   does not resolve or a failed verification ends the command at once;
3. Flower's SuperNode runs in the foreground. When the SuperLink refuses to activate it:
   if the previous session of this device ended without signing off less than
   STALE_SESSION_SECONDS ago, the SuperLink still holds it: wait and start again with
   backoff until it is released; otherwise the key is not enrolled (or was revoked).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fedinterest.client.device_dir import DeviceDir, public_key_fingerprint
from fedinterest.client.device_session import STALE_SESSION_SECONDS, DeviceSession
from fedinterest.client.superlink_probe import probe
from fedinterest.client.supernode import SuperNodeLaunch, run_supernode

EXIT_UNREACHABLE = 3  # the SuperLink could not be reached (address, TLS)
EXIT_NOT_ENROLLED = 4  # the SuperLink refused this device's key
FIRST_BACKOFF, MAX_BACKOFF = 2.0, 30.0


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** attempt)


def wait_for_superlink(
    server: str, ca: Path, *, max_retries: int | None, max_wait_time: float | None, say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Until the SuperLink answers; None when it does, else why it never did (the address and the reason)."""
    started, attempt = time.monotonic(), 0
    while True:
        result = probe(server, ca)
        if result.ok:
            return None
        if not result.retryable:
            return f"cannot connect to the SuperLink at {server}: {result.reason}"
        waited = time.monotonic() - started
        out_of_tries = max_retries is not None and attempt >= max_retries
        out_of_time = max_wait_time is not None and waited + _backoff(attempt) > max_wait_time
        if out_of_tries or out_of_time:
            return f"the SuperLink at {server} did not answer after {attempt + 1} attempt(s) in {waited:.0f} s: {result.reason}"
        say(f"waiting for the SuperLink at {server}: {result.reason}; next attempt in {_backoff(attempt):.0f} s")
        sleep(_backoff(attempt))
        attempt += 1


def not_enrolled_message(device: DeviceDir, server: str) -> str:
    """What to do when the SuperLink does not know this device's key."""
    line = device.public_key.read_text(encoding="ascii").split()
    fingerprint = public_key_fingerprint(" ".join(line[:2]))
    return (
        f"the SuperLink at {server} refused to activate this device ('Failed to activate SuperNode'): its key "
        f"({fingerprint}) is not enrolled there, or was revoked. Send {device.public_key} to the operator, who runs "
        f"`fedinterest server enroll {device.public_key.name} --name NAME`; a revoked key needs a new device directory"
    )


def start_device(
    device: DeviceDir, launch: SuperNodeLaunch, *, server: str, ca: Path, max_retries: int | None = None,
    max_wait_time: float | None = None, say: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the device's SuperNode until it stops; the exit code (AlreadyRunning raised before anything starts)."""
    with DeviceSession(device.root) as session:
        session.set_server(server)
        problem = wait_for_superlink(server, ca, max_retries=max_retries, max_wait_time=max_wait_time, say=say, sleep=sleep)
        if problem is not None:
            say(f"error: {problem}")
            return EXIT_UNREACHABLE
        previous, attempt = session.previous, 0
        while True:
            say(f"starting flower-supernode for {device.root} -> {server}")
            ended = run_supernode(launch, on_start=session.set_supernode, on_activated=session.set_activated)
            session.set_supernode(None)
            if not ended.activation_refused:
                return ended.code
            since = previous.seconds_since_alive()
            if previous.unclean and since is not None and since < STALE_SESSION_SECONDS:
                pause = _backoff(attempt)
                say(
                    f"the SuperLink still holds this device's previous session, which stopped without signing off "
                    f"{since:.0f} s ago (killed?); Flower releases it after about a minute without heartbeats: "
                    f"starting again in {pause:.0f} s"
                )
                sleep(pause)
                attempt += 1
                continue
            say(f"error: {not_enrolled_message(device, server)}")
            return EXIT_NOT_ENROLLED
