"""The deployment directory: what `fedinterest server init` creates and every other command reads.

    DIR/
      fedinterest-server.toml   [server] host, port, SANs; [run] the run defaults (RunConfig keys)
      catalogue.txt             the item catalogue, one raw item id per line (line i = item i)
      tls/ca.crt, tls/ca.key    the deployment's CA (ca.key 0600: needed only to issue certificates)
      tls/server.crt, .key      the SuperLink's certificate, signed by the CA, with the SANs
      devices.json              the enrolment table: name <-> public key <-> Flower node id
      flwr-home/                FLWR_HOME of every Flower process: config.toml (the connection)
      state/superlink.db        the SuperLink's SQLite database (runs, nodes, messages)
      runs/<run>/               one directory per submitted run (run.json, metrics, checkpoints)
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedinterest.common.errors import FedinterestError
from fedinterest.common.run_config import RUN_MANAGED, RunConfig, keys_with
from fedinterest.common.run_overrides import toml_value
from fedinterest.common.serialization import atomic_write_text
from fedinterest.common.structured_files import read_toml
from fedinterest.server import certificates as certs

CONFIG_FILE = "fedinterest-server.toml"
CATALOGUE_FILE = "catalogue.txt"
DEVICES_FILE = "devices.json"
TLS_DIR = "tls"
FLWR_HOME_DIR = "flwr-home"
STATE_DIR = "state"
RUNS_DIR = "runs"
CONNECTION = "fedinterest"  # the SuperLink connection's name in flwr-home/config.toml
DEFAULT_PORT = 9092
# Loopback by default: the one HTTPS port also serves Flower's Control API (submit, stop,
# register and unregister), which authenticates nothing beyond reaching the port (issue 16).
DEFAULT_HOST = "127.0.0.1"
ENV_DIR = "FEDINTEREST_SERVER_DIR"
# Run-config keys `fedinterest server run` sets itself, so they are no run defaults.
RUN_MANAGED_KEYS = keys_with(RUN_MANAGED)
# Loopback SANs are always in the certificate: the SuperLink's own ServerApp process and
# the operator's `flwr` commands reach it over loopback with the same certificate check.
LOOPBACK_SANS = ("127.0.0.1", "localhost")
_BIND_ALL = ("0.0.0.0", "::")


class DeploymentError(FedinterestError, ValueError):
    """A deployment directory or setting that cannot be used (the message names what and where)."""


@dataclass(frozen=True)
class ServerSettings:
    """The `[server]` table: where the SuperLink listens and the names its certificate carries."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    sans: tuple[str, ...] = LOOPBACK_SANS

    @property
    def local_address(self) -> str:
        """host:port the operator's own `flwr` commands dial (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in _BIND_ALL else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True)
class Deployment:
    """A deployment directory and its settings."""

    root: Path
    server: ServerSettings
    run_defaults: dict[str, Any]

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def catalogue(self) -> Path:
        return self.root / CATALOGUE_FILE

    @property
    def devices_file(self) -> Path:
        return self.root / DEVICES_FILE

    @property
    def ca_cert(self) -> Path:
        return self.root / TLS_DIR / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / TLS_DIR / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / TLS_DIR / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / TLS_DIR / "server.key"

    @property
    def flwr_home(self) -> Path:
        return self.root / FLWR_HOME_DIR

    @property
    def database(self) -> Path:
        return self.root / STATE_DIR / "superlink.db"

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR


def run_defaults() -> dict[str, Any]:
    """RunConfig's defaults (= pyproject's [tool.flwr.app.config]) without the keys `server run` sets."""
    return {k: v for k, v in RunConfig().to_flower().items() if k not in RUN_MANAGED_KEYS}


def is_exposed(host: str) -> bool:
    """Whether the SuperLink listening on `host` can be reached from other machines."""
    if host in _BIND_ALL:
        return True
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"  # a DNS name: whatever interface it resolves to


def exposure_warning(settings: ServerSettings) -> str | None:
    """What listening on a non-loopback address means, or None on loopback."""
    if not is_exposed(settings.host):
        return None
    return (
        f"the SuperLink will listen on {settings.host}:{settings.port}. That one port also serves Flower's Control API "
        "(submit and stop runs, register and unregister devices), which has no authentication beyond reaching the port "
        "over TLS: anyone who can connect to it can run code on every enrolled device through a submitted app. "
        "Firewall the port so that only the devices' network reaches it, and run the operator's commands on this machine"
    )


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DeploymentError(f"port must be an integer in 1..65535, got {port!r}")
    return port


def _check_host(host: str) -> str:
    if host in _BIND_ALL:
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return certs.parse_san(host).value  # a DNS name; raises CertificateError naming it


def init_deployment(
    root: Path, sans: list[str], *, catalogue: Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> Deployment:
    """Create a deployment directory: CA, server certificate, config, empty enrolment list.

    Refuses a directory that exists and is not empty; on any error nothing is left behind.
    """
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DeploymentError(f"{root}: already exists and is not an empty directory; init never overwrites a deployment")
    host = _check_host(host)
    port = _check_port(port)
    parsed = [certs.parse_san(s) for s in sans]  # CertificateError names a bad one before anything is written
    if catalogue is not None and not Path(catalogue).is_file():
        raise DeploymentError(f"--catalogue {catalogue}: no such file")
    ordered: list[certs.San] = []
    extra = [host] if host not in _BIND_ALL else []
    for san in [*parsed, *(certs.parse_san(s) for s in (*LOOPBACK_SANS, *extra))]:
        if san not in ordered:
            ordered.append(san)
    created = not root.exists()
    try:
        deployment = Deployment(root=root.resolve() if root.exists() else root.absolute(), server=ServerSettings(host, port, tuple(s.value for s in ordered)), run_defaults=run_defaults())
        _write_tree(deployment, ordered, catalogue)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return load_deployment(root)


def _write_tree(deployment: Deployment, sans: list[certs.San], catalogue: Path | None) -> None:
    root = deployment.root
    root.mkdir(parents=True, exist_ok=True)
    tls = root / TLS_DIR
    tls.mkdir(mode=0o700)
    for name in (STATE_DIR, RUNS_DIR):
        (root / name).mkdir(mode=0o700)
    deployment.flwr_home.mkdir(mode=0o700)
    ca_key, ca_cert = certs.create_ca(f"fedinterest deployment CA ({root.name})")
    server_key, server_cert = certs.issue_server_certificate(ca_key, ca_cert, sans)
    certs.write_private_key(deployment.ca_key, ca_key)
    certs.write_certificate(deployment.ca_cert, ca_cert)
    certs.write_private_key(deployment.server_key, server_key)
    certs.write_certificate(deployment.server_cert, server_cert)
    if catalogue is not None:
        shutil.copyfile(catalogue, deployment.catalogue)
        count_catalogue(deployment.catalogue)  # raises on an unusable catalogue; init then leaves nothing
        from fedinterest.server.catalogue_build import popularity_file

        if popularity_file(Path(catalogue)).is_file():  # built by `server catalogue`: its baseline comes along
            shutil.copyfile(popularity_file(Path(catalogue)), popularity_file(deployment.catalogue))
    atomic_write_text(deployment.devices_file, "[]\n")
    atomic_write_text(deployment.config_file, _config_text(deployment))
    write_flower_connection(deployment)


def _config_text(deployment: Deployment) -> str:
    server = deployment.server
    lines = [
        "# fedinterest deployment (written by `fedinterest server init`; edit, then restart `server start`).",
        "# [server]: where the SuperLink listens; sans are the names in tls/server.crt (changing them",
        "# here does not reissue the certificate).",
        "[server]",
        f"host = {toml_value(server.host)}",
        f"port = {server.port}",
        f"sans = [{', '.join(toml_value(s) for s in server.sans)}]",
        "",
        "# [run]: defaults of `fedinterest server run` (RunConfig keys, common/run_config.py);",
        "# `--set key=value` overrides one run. dataset, num-items and run-dir are set by `server run`.",
        "[run]",
        *(f"{k} = {toml_value(v)}" for k, v in deployment.run_defaults.items()),
        "",
    ]
    return "\n".join(lines)


def write_flower_connection(deployment: Deployment) -> Path:
    """flwr-home/config.toml: the deployment's SuperLink as the default connection, trusting the CA."""
    path = deployment.flwr_home / "config.toml"
    atomic_write_text(
        path,
        "# Written by `fedinterest server`: the operator's connection to this deployment's SuperLink.\n"
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\naddress = {toml_value(deployment.server.local_address)}\n"
        f"root-certificates = {toml_value(str(deployment.ca_cert))}\n",
    )
    return path


def load_deployment(root: Path | None) -> Deployment:
    """Read a deployment directory; DeploymentError names the missing or bad file."""
    if root is None:
        raise DeploymentError(f"no deployment directory: pass --dir DIR or set {ENV_DIR}")
    root = Path(root).expanduser()
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise DeploymentError(f"{root}: not a deployment directory (no {CONFIG_FILE}; create one with `fedinterest server init`)")
    document = read_toml(config_file, DeploymentError)
    table = document.get("server", {})
    unknown = sorted(set(table) - {f.name for f in fields(ServerSettings)})
    if unknown:
        raise DeploymentError(f"{config_file}: unknown [server] keys {unknown}; known: host, port, sans")
    try:
        server = ServerSettings(
            host=_check_host(str(table.get("host", DEFAULT_HOST))),
            port=_check_port(table.get("port", DEFAULT_PORT)),
            sans=tuple(str(s) for s in table.get("sans", LOOPBACK_SANS)),
        )
    except (DeploymentError, certs.CertificateError) as err:
        raise DeploymentError(f"{config_file}: [server] {err}") from err
    run = document.get("run", {})
    managed = sorted(set(run) & set(RUN_MANAGED_KEYS))
    if managed:
        raise DeploymentError(f"{config_file}: [run] sets {managed}, which `fedinterest server run` sets itself; remove them")
    known = set(RunConfig().to_flower())
    bad = sorted(set(run) - known)
    if bad:
        raise DeploymentError(f"{config_file}: unknown [run] keys {bad}")
    deployment = Deployment(root=root.resolve(), server=server, run_defaults=dict(run))
    for path in (deployment.ca_cert, deployment.server_cert, deployment.server_key):
        if not path.is_file():
            raise DeploymentError(f"{path}: missing from the deployment directory")
    return deployment


def count_catalogue(path: Path) -> int:
    """How many items the catalogue file lists (common/catalogue.py reads and checks it)."""
    from fedinterest.common.catalogue import load_catalogue

    if not Path(path).is_file():
        raise DeploymentError(f"{path}: no catalogue (give one to `server init --catalogue FILE`, or copy it there)")
    try:
        return len(load_catalogue(path))
    except ValueError as err:  # DataFormatError names the file and line
        raise DeploymentError(str(err)) from err


def private_key_mode_ok(path: Path) -> bool:
    """Whether a private key file is readable by its owner only."""
    return (os.stat(path).st_mode & 0o077) == 0
