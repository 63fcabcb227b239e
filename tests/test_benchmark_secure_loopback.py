"""The loopback secure-aggregation benchmark's bookkeeping: messages and bytes a round from device
logs and relay counts, the byte relay itself, and the table (no federation, no timing here)."""

from __future__ import annotations

import socket
import time

from fedinterest.benchmarks import secure_loopback
from fedinterest.benchmarks.tcp_meter import Counts, Relay


class _Logged:
    """A device's (type, received, sent) messages, as loopback_federation.Device reads them from its log."""

    def __init__(self, messages: list[tuple[str, float, float]]) -> None:
        self._messages = messages

    def messages(self) -> list[tuple[str, float, float]]:
        return self._messages


def test_a_secure_round_is_four_train_messages_and_the_bytes_since_the_previous_reply() -> None:
    # An earlier run's message, the survey, two rounds of four stages, the evaluation.
    log = [("train", 1.0, 2.0), ("query", 10.5, 11.0)]
    log += [("train", 12.0 + i, 12.5 + i) for i in range(8)] + [("evaluate", 30.0, 31.0)]
    counts = Counts(to_device=[(t, 100) for t in (1.5, 10.8, 12.2, 12.4, 13.2, 19.2, 30.5)],
                    from_device=[(t, 10) for t in (1.9, 10.9, 12.45, 19.45, 30.9)])
    rounds = secure_loopback.device_rounds(_Logged(log), counts, start=10.0, end=40.0, stages=4)
    assert rounds == [
        {"messages": 8, "bytes_to_devices": 300, "bytes_from_devices": 10, "stages": [[200, 10], [100, 0], [0, 0], [0, 0]]},
        {"messages": 8, "bytes_to_devices": 100, "bytes_from_devices": 10, "stages": [[0, 0], [0, 0], [0, 0], [100, 10]]},
    ]
    assert len(secure_loopback.device_rounds(_Logged(log), counts, start=10.0, end=40.0, stages=1)) == 8


def test_the_relay_forwards_both_ways_and_counts_each_byte() -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        relay = Relay(upstream.getsockname()[1])
        try:
            with socket.create_connection(("127.0.0.1", relay.port)) as device:
                server_side, _ = upstream.accept()
                with server_side:
                    device.sendall(b"x" * 1000)
                    assert _read(server_side, 1000) == b"x" * 1000
                    server_side.sendall(b"y" * 300)
                    assert _read(device, 300) == b"y" * 300
            deadline = time.monotonic() + 5
            while relay.counts.between(0, time.monotonic()) != (300, 1000) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert relay.counts.between(0, time.monotonic()) == (300, 1000)
        finally:
            relay.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def _run(aggregation: str, messages: int, to_device: int, from_device: int, seconds: float) -> dict:
    # The first round also downloads the app bundle (5 MB here): kept out of the per-round bytes.
    rounds = [{"round": r, "devices_answered": 3, "server_messages": messages, "messages": messages,
               "bytes_to_devices": to_device + (5_000_000 if r == 1 else 0), "bytes_from_devices": from_device, "seconds": seconds,
               "protocol_seconds": seconds - 1} for r in (1, 2)]
    return {"aggregation": aggregation, "rounds": rounds, "load_average": [4.0, 5.5]}


def test_the_table_has_a_row_per_aggregation_and_their_ratio() -> None:
    runs = [_run("plain", 6, 1_000_000, 1_000_000, 5.0), _run("secagg+", 24, 1_100_000, 2_000_000, 15.0)] * 2
    result = {"devices": 3, "runs": runs, "commit": "abc1234", "command": "python -m fedinterest.benchmarks.secure_loopback --devices 3"}
    rows = secure_loopback.table([result]).splitlines()[2:5]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][:10] == ["3", "plain (trusted server)", "4", "6 (6)", "1.000", "1.000", "5.00", "5.0, 5.0, 5.0, 5.0", "5.0", "4.0"]
    assert cells[1][:7] == ["3", "SecAgg+", "4", "24 (24)", "1.100", "2.000", "5.00"]
    assert cells[0][10:] == ["4.0–5.5", "abc1234"]
    assert cells[2][3:10] == ["**4.0×**", "**1.10×**", "**2.00×**", "", "", "**3.0×**", "**3.5×**"]
    assert "    python -m fedinterest.benchmarks.secure_loopback --devices 3" in secure_loopback.table([result])


def test_both_aggregations_run_the_same_settings_but_the_aggregation() -> None:
    plain, secure = (secure_loopback.settings(a, 3, 2) for a in secure_loopback.AGGREGATIONS)
    assert [s for s in plain if s not in secure] == ["aggregation=plain"]
    assert [s for s in secure if s not in plain] == ["aggregation=secagg+"]
    assert "user-noise-multiplier=1.0" in plain and "eval-every=2" in plain
