"""Which devices may join: Flower's SuperNode registration plus a name <-> key <-> node-id table.

Flower knows a device by its public key and a node id (`flwr supernode register /
unregister / list` against the running SuperLink); operators know it by a name. The
table in `DIR/devices.json` keeps the three together, revoked entries included: Flower
never accepts an unregistered key again, so the table says why a key is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedinterest.common.errors import FedinterestError
from fedinterest.common.serialization import atomic_write_text
from fedinterest.common.structured_files import read_json
from fedinterest.server.deployment import Deployment, DeploymentError
from fedinterest.server.flower_processes import SuperLinkNotReady, flwr_json
from fedinterest.server.superlink import require_ready, superlink_env

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The curves Flower's node authentication accepts (NIST P-curves).
_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class EnrollmentError(FedinterestError, ValueError):
    """An enrolment request that cannot be carried out (the message says what and where)."""


@dataclass(frozen=True)
class Device:
    """One row of the enrolment table."""

    name: str
    public_key: str  # the OpenSSH public key line, as enrolled
    key_sha256: str  # OpenSSH-style fingerprint ("SHA256:..."), what `ssh-keygen -lf KEY` prints
    node_id: int
    enrolled_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    """A device name: 1-64 of letters, digits, `_ . -`, starting with a letter or digit."""
    if not _NAME.match(name):
        raise EnrollmentError(f"device name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
    return name


def read_public_key(path: Path) -> tuple[str, str]:
    """(OpenSSH key line, fingerprint) of an EC public key on a NIST curve in OpenSSH format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EnrollmentError(f"{path}: no such public key file")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise EnrollmentError(f"{path}: this is a private key; enrol the device's public key (the .pub file) and keep the private key on the device")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise EnrollmentError(f"{path}: not an OpenSSH public key ({err}); expected a line like 'ecdsa-sha2-nistp384 AAAA...'") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _NIST_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise EnrollmentError(f"{path}: Flower's node authentication needs an EC key on a NIST curve (P-256/384/521), got {kind}")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return line, f"SHA256:{digest}"


def load_devices(deployment: Deployment) -> list[Device]:
    """The enrolment table (revoked devices included)."""
    path = deployment.devices_file
    rows = read_json(path, DeploymentError, missing=f"{path}: the enrolment table is missing")
    try:
        return [Device(**row) for row in rows]
    except TypeError as err:
        raise DeploymentError(f"{path}: not an enrolment table ({err})") from err


def _save_devices(deployment: Deployment, devices: list[Device]) -> None:
    atomic_write_text(deployment.devices_file, json.dumps([asdict(d) for d in devices], indent=2) + "\n")


def find_device(deployment: Deployment, name: str) -> Device:
    """The active device called `name`; EnrollmentError when there is none."""
    devices = load_devices(deployment)
    for device in devices:
        if device.name == name and device.active:
            return device
    revoked = [d for d in devices if d.name == name]
    if revoked:
        raise EnrollmentError(f"device {name!r} was revoked on {revoked[-1].revoked_at} ({deployment.devices_file})")
    known = ", ".join(d.name for d in devices if d.active) or "none"
    raise EnrollmentError(f"no enrolled device called {name!r} in {deployment.devices_file} (enrolled: {known})")


def enroll(deployment: Deployment, public_key: Path, name: str) -> Device:
    """Register the device's public key with the running SuperLink and record it under `name`."""
    check_name(name)
    line, fingerprint = read_public_key(public_key)
    devices = load_devices(deployment)
    for device in devices:
        if device.name == name and device.active:
            raise EnrollmentError(f"a device called {name!r} is already enrolled (node {device.node_id}); revoke it first or pick another name")
        if device.key_sha256 == fingerprint:
            if device.active:
                raise EnrollmentError(f"{public_key}: this key is already enrolled as {device.name!r} (node {device.node_id})")
            raise EnrollmentError(
                f"{public_key}: this key was revoked on {device.revoked_at} (as {device.name!r}); Flower never accepts a "
                "revoked key again: create a new key on the device and enrol that"
            )
    require_ready(deployment)
    try:
        reply = flwr_json(["supernode", "register", str(Path(public_key).expanduser().resolve())], superlink_env(deployment))
    except RuntimeError as err:
        raise EnrollmentError(f"the SuperLink refused to register {public_key}: {err}") from err
    device = Device(name=name, public_key=line, key_sha256=fingerprint, node_id=int(reply["node-id"]), enrolled_at=_now())
    _save_devices(deployment, [*devices, device])
    return device


def revoke(deployment: Deployment, name: str) -> Device:
    """Unregister the device called `name` from the SuperLink; it can no longer connect."""
    device = find_device(deployment, name)
    require_ready(deployment)
    try:
        flwr_json(["supernode", "unregister", str(device.node_id)], superlink_env(deployment))
    except RuntimeError as err:
        raise EnrollmentError(f"the SuperLink could not unregister {name!r} (node {device.node_id}): {err}") from err
    revoked = replace(device, revoked_at=_now())
    _save_devices(deployment, [revoked if d == device else d for d in load_devices(deployment)])
    return revoked


def device_json(device: Device) -> dict[str, Any]:
    """A device row for JSON output: the node id as text (64-bit ids are corrupted by JSON readers that use doubles)."""
    return {**asdict(device), "node_id": str(device.node_id)}


def node_statuses(deployment: Deployment) -> dict[int, str]:
    """Flower's status of every node it knows (registered, online, offline, unregistered)."""
    reply = flwr_json(["supernode", "list", "--verbose"], superlink_env(deployment))
    return {int(node["node-id"]): str(node["status"]) for node in reply.get("nodes", [])}


def device_rows(deployment: Deployment, *, include_revoked: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """The enrolment table joined with Flower's live node status; (rows, why status is missing or None)."""
    devices = [d for d in load_devices(deployment) if include_revoked or d.active]
    try:
        require_ready(deployment)
        statuses: dict[int, str] | None = node_statuses(deployment)
        problem = None
    except (SuperLinkNotReady, RuntimeError) as err:
        statuses, problem = None, f"no live status: {err}"
    rows = []
    for device in devices:
        row = device_json(device)
        row["status"] = statuses.get(device.node_id, "unknown to the SuperLink") if statuses is not None else None
        rows.append(row)
    return rows, problem
