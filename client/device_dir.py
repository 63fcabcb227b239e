"""A device directory: its key pair, its store and Flower's home, created once by `device init`.

Layout:
    DIR/device.json          marker: format version, creation time, public key fingerprint
    DIR/keys/device_key      EC P-384 private key, OpenSSH format, mode 0600 (never leaves the device)
    DIR/keys/device_key.pub  its public key, OpenSSH format: what the operator enrolls
    DIR/store.sqlite         history, catalogue, models and privacy ledger (client/device_store.py)
    DIR/flwr-home/           FLWR_HOME of the device's SuperNode

Flower 1.41's SuperNode loads the private key with `load_ssh_private_key` and
`flwr supernode register` accepts an OpenSSH public key of a NIST EC curve; P-384 is
the curve Flower itself generates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedinterest.client.device_store import DeviceStore
from fedinterest.common.catalogue import load_catalogue
from fedinterest.common.errors import FedinterestError

LAYOUT_VERSION = 1
MARKER = "device.json"
STORE_FILE = "store.sqlite"
PRIVATE_KEY = "keys/device_key"
PUBLIC_KEY = "keys/device_key.pub"
FLWR_HOME = "flwr-home"


class DeviceDirError(FedinterestError, ValueError):
    """The device directory is missing, not initialised, or would be overwritten."""


@dataclass(frozen=True)
class DeviceDir:
    """The paths of one initialised device directory."""

    root: Path

    @property
    def store_path(self) -> Path:
        return self.root / STORE_FILE

    @property
    def private_key(self) -> Path:
        return self.root / PRIVATE_KEY

    @property
    def public_key(self) -> Path:
        return self.root / PUBLIC_KEY

    @property
    def flwr_home(self) -> Path:
        return self.root / FLWR_HOME

    def store(self) -> DeviceStore:
        """Open the device's store."""
        return DeviceStore(self.store_path)


def open_device_dir(path: str | Path) -> DeviceDir:
    """The initialised device directory at `path`; DeviceDirError naming what is missing otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DeviceDirError(f"{root}: no device directory here (create one with `fedinterest device init {root} --catalogue FILE`)")
    marker = root / MARKER
    if not marker.is_file():
        raise DeviceDirError(f"{root}: not an initialised device directory ({MARKER} is missing; run `fedinterest device init`)")
    try:
        version = json.loads(marker.read_text(encoding="utf-8")).get("layout_version")
    except (json.JSONDecodeError, AttributeError) as e:
        raise DeviceDirError(f"{marker}: unreadable device marker ({e})") from None
    if version != LAYOUT_VERSION:
        raise DeviceDirError(f"{marker}: device layout version {version!r}, this software reads {LAYOUT_VERSION}")
    device = DeviceDir(root)
    for needed in (device.store_path, device.private_key, device.public_key):
        if not needed.is_file():
            raise DeviceDirError(f"{root}: device directory is incomplete, {needed.relative_to(root)} is missing")
    return device


def init_device_dir(path: str | Path, catalogue_path: str | Path) -> DeviceDir:
    """Create a device directory (key pair, store with the catalogue); refuses an existing non-empty directory."""
    root = Path(path).expanduser()
    catalogue = load_catalogue(catalogue_path)  # checked before anything is created
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DeviceDirError(f"{root}: already exists and is not an empty directory; refusing to overwrite it")
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    device = DeviceDir(root)
    try:
        root.chmod(0o700)  # the user's history and key: readable by the device's owner only
        public_line = _write_key_pair(device.private_key, device.public_key)
        device.store_path.touch(mode=0o600)  # SQLite keeps the mode, and gives it to its -wal file
        with DeviceStore(device.store_path, create=True) as store:
            store.set_catalogue(catalogue)
        device.flwr_home.mkdir()
        marker = {
            "layout_version": LAYOUT_VERSION,
            "created_at": time.time(),
            "public_key_sha256": public_key_fingerprint(public_line),
            "catalogue_items": len(catalogue),
        }
        # The marker is written last: a directory without it is an init that did not finish.
        (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        # Leave nothing half-made behind (the directory was empty or absent before).
        if created_root:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return device


def _write_key_pair(private_path: Path, public_path: Path) -> str:
    """A fresh EC P-384 key pair in OpenSSH format; the private file is created 0600. Returns the public line."""
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),  # the SuperNode reads it unattended
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_bytes)
    public_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    public_path.write_text(public_line + " fedinterest-device\n", encoding="ascii")
    return public_line


def public_key_fingerprint(public_line: str) -> str:
    """`SHA256:...` fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
