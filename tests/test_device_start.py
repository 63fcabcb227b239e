"""`device start` says what is wrong before Flower's SuperNode would hang or retry forever (issue 16, item 5).

A CA file that is no certificate, a name that does not resolve, a server whose certificate
the CA did not sign: each is one `error:` line naming the file or the address and the
reason, a quick exit, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from device_helpers import item_ids
from tls_stub import HealthServer, write_ca_and_server
from typer.testing import CliRunner

from fedinterest.client.device_cli import app
from fedinterest.client.device_session import AlreadyRunning, DeviceSession, running_session
from fedinterest.common.catalogue import write_catalogue


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    catalogue = write_catalogue(tmp_path / "catalogue.txt", item_ids(10))
    assert CliRunner().invoke(app, ["init", str(tmp_path / "dev"), "--catalogue", str(catalogue)]).exit_code == 0
    return tmp_path / "dev"


def _start(device_dir: Path, server: str, ca: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`fedinterest device start` as a process (as a device owner runs it), giving up after one retry."""
    command = [str(Path(sys.executable).parent / "fedinterest"), "device", "start", "--dir", str(device_dir), "--server", server,
               "--ca", str(ca), "--max-retries", "1", "--max-wait-time", "3"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "FLWR_HOME": str(device_dir / "flwr-home")})


@pytest.mark.parametrize("content", [b"not a certificate\n", b"", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_a_ca_file_that_is_no_certificate_is_named(device_dir: Path, tmp_path: Path, content: bytes) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(content)
    result = _start(device_dir, "127.0.0.1:9", ca, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--ca {ca}: not a PEM certificate" in result.stderr and "tls/ca.crt" in result.stderr
    assert "Traceback" not in result.stderr and "SSLError" not in result.stderr


def test_a_name_that_does_not_resolve_is_named(device_dir: Path, tmp_path: Path) -> None:
    ca, _, _ = write_ca_and_server(tmp_path)
    result = _start(device_dir, "no-such-host.invalid:9092", ca)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot connect to the SuperLink at no-such-host.invalid:9092: the name 'no-such-host.invalid' does not resolve" in result.stderr


def test_a_server_the_ca_did_not_sign_is_refused_at_once(device_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "impostor").mkdir()
    ca, _, _ = write_ca_and_server(tmp_path / "real")
    _, cert, key = write_ca_and_server(tmp_path / "impostor")
    with HealthServer(cert, key) as port:
        result = _start(device_dir, f"127.0.0.1:{port}", ca)
    assert result.returncode == 3, result.stderr[-2000:]
    assert f"cannot connect to the SuperLink at 127.0.0.1:{port}: TLS verification failed" in result.stderr
    assert "Starting Flower SuperNode" not in result.stderr  # it never dialled the Fleet API


def test_one_session_per_device_directory(device_dir: Path) -> None:
    """The lock that tells a second start from an unenrolled key (the SuperLink says 2004 to both)."""
    assert running_session(device_dir) is None
    with DeviceSession(device_dir) as first:
        assert running_session(device_dir)["pid"] == os.getpid()
        with pytest.raises(AlreadyRunning, match="this device is already running"):
            DeviceSession(device_dir).__enter__()
        assert not first.previous.unclean  # the first start ever: no earlier session
    assert running_session(device_dir) is None
    record = json.loads((device_dir / "supernode.lock").read_text())
    assert record["stopped_at"] is not None  # a clean stop is recorded
    with DeviceSession(device_dir) as second:
        assert second.previous.stopped_at is not None and not second.previous.unclean
