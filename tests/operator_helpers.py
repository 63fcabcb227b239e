"""Helpers of the operator tests: device keys, catalogues, a deployment's SuperLink as a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedinterest.server.deployment import Deployment
from fedinterest.server.flower_processes import flower_env, terminate
from fedinterest.server.superlink import wait_ready

FEDINTEREST = str(Path(sys.executable).parent / "fedinterest")


def write_ec_key(directory: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, like a device's: (private key, public key)."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    private = directory / name
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private.chmod(0o600)
    public = directory / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def write_rsa_public_key(path: Path) -> Path:
    """An RSA public key in OpenSSH format (Flower's node authentication refuses it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path


def write_catalogue(path: Path, n: int = 40) -> Path:
    """A catalogue of n raw item ids."""
    path.write_text("".join(f"item-{i}\n" for i in range(1, n + 1)), encoding="utf-8")
    return path


def child_env(home: Path) -> dict[str, str]:
    """The environment of a process a test starts: offline flags, a private FLWR_HOME, this venv first on PATH
    (Flower starts `flower-superexec` by name)."""
    return flower_env(home)


class ServerProcess:
    """`fedinterest server start --dir DIR` as a child process, stopped (SIGTERM) on exit."""

    def __init__(self, deployment: Deployment, log: Path) -> None:
        self.deployment = deployment
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                [FEDINTEREST, "server", "start", "--dir", str(self.deployment.root)],
                stdout=handle, stderr=subprocess.STDOUT, env=child_env(self.deployment.root / "test-home"),
            )
        try:
            wait_ready(self.deployment, timeout=90)
        except Exception:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        """SIGTERM (the SuperLink stops its ServerApp process), SIGKILL if it lingers; the exit code."""
        return None if self.process is None else terminate(self.process, grace=30)
