"""`fedinterest server` against a real SuperLink (TLS, node authentication) on loopback, without devices."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from operator_helpers import ServerProcess, write_catalogue, write_ec_key
from typer.testing import CliRunner

from fedinterest.server.deployment import Deployment, load_deployment
from fedinterest.server.flower_processes import free_port
from fedinterest.simulations.cli import app

runner = CliRunner()


def invoke(*args: str) -> Result:
    return runner.invoke(app, ["server", *args])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("operator")
    catalogue = write_catalogue(root / "items.txt", 30)
    result = invoke("init", str(root / "dep"), "--san", "127.0.0.1", "--catalogue", str(catalogue), "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.exit_code == 0, result.output
    deployment = load_deployment(root / "dep")
    with ServerProcess(deployment, root / "server.log"):
        yield deployment


def test_tls_with_the_ca_only(server: Deployment) -> None:
    url = f"https://{server.server.local_address}/health"
    with urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context(cafile=str(server.ca_cert))) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(url, timeout=5)  # the system trust store does not know the deployment's CA
    assert server.database.is_file()  # the SuperLink's state lives in DIR


def test_enroll_devices_revoke(server: Deployment, tmp_path: Path) -> None:
    _, key_a = write_ec_key(tmp_path, "a")
    _, key_b = write_ec_key(tmp_path, "b")
    root = str(server.root)
    first = invoke("enroll", str(key_a), "--name", "phone-a", "--dir", root, "--json")
    assert first.exit_code == 0, first.output
    node_a = json.loads(first.stdout)["node_id"]
    assert invoke("enroll", str(key_b), "--name", "phone-b", "--dir", root).exit_code == 0
    again = invoke("enroll", str(key_a), "--name", "other", "--dir", root)
    assert again.exit_code == 2 and "already enrolled as 'phone-a'" in again.output
    taken = invoke("enroll", str(key_b), "--name", "phone-a", "--dir", root)
    assert taken.exit_code == 2 and "already enrolled" in taken.output

    listing = json.loads(invoke("devices", "--dir", root, "--json").stdout)
    assert listing["status_error"] is None
    by_name = {d["name"]: d for d in listing["devices"]}
    assert set(by_name) == {"phone-a", "phone-b"}
    assert by_name["phone-a"]["node_id"] == node_a and by_name["phone-a"]["status"] == "registered"

    revoked = invoke("revoke", "phone-a", "--dir", root)
    assert revoked.exit_code == 0, revoked.output
    listing = json.loads(invoke("devices", "--dir", root, "--json").stdout)
    assert [d["name"] for d in listing["devices"]] == ["phone-b"]
    every = json.loads(invoke("devices", "--dir", root, "--all", "--json").stdout)
    assert {d["name"]: d["status"] for d in every["devices"]} == {"phone-a": "unregistered", "phone-b": "registered"}
    # Flower never takes a revoked key back: the operator is told why.
    back = invoke("enroll", str(key_a), "--name", "phone-a", "--dir", root)
    assert back.exit_code == 2 and "was revoked" in back.output
    gone = invoke("revoke", "phone-a", "--dir", root)
    assert gone.exit_code == 2 and "was revoked" in gone.output
    table = invoke("devices", "--dir", root)
    assert table.exit_code == 0 and "phone-b" in table.output and "registered" in table.output


def test_run_without_devices_fails_and_status_says_so_from_flower(server: Deployment) -> None:
    root = str(server.root)
    result = invoke("run", "--dir", root, "--set", "round-timeout=3", "--set", "num-server-rounds=1", "--set", "clients-per-round=1",
                    "--set", "dim=16", "--set", "max-len=20", "--wait", "--timeout-minutes", "3", "--json")
    assert result.exit_code == 1, result.output  # --wait: not completed
    facts = json.loads(result.stdout)
    state = facts["state"]
    assert state["status"] == "finished:failed" and not state["completed"]
    assert "no node" in state["flower"]["status-details"]
    record = json.loads((Path(facts["run_dir"]) / "run.json").read_text())
    assert str(record["run_id"]) == facts["run_id"] and isinstance(facts["run_id"], str)
    assert record["run_config"]["dataset"] == "deployed" and record["run_config"]["num-items"] == 30
    assert record["run_config"]["run-dir"] == facts["run_dir"]
    status = invoke("status", str(facts["run_id"]), "--dir", root)
    assert status.exit_code == 0 and "finished:failed" in status.output
    stopped = invoke("stop", str(facts["run_id"]), "--dir", root)
    assert stopped.exit_code == 2 and "already finished" in stopped.output


def test_stop_a_waiting_run(server: Deployment) -> None:
    root = str(server.root)
    submitted = invoke("run", "--dir", root, "--set", "round-timeout=300", "--set", "dim=16", "--set", "max-len=20", "--json")
    assert submitted.exit_code == 0, submitted.output
    run_id = json.loads(submitted.stdout)["run_id"]
    stopped = invoke("stop", str(run_id), "--dir", root, "--json")
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.stdout)["status"] == "finished:stopped"
    state = json.loads(invoke("status", str(run_id), "--dir", root, "--json").stdout)
    assert state["status"] == "finished:stopped" and state["rounds_done"] == 0


def test_the_superlink_waits_longer_for_its_sqlite_lock(server: Deployment) -> None:
    """Flower's 5 s busy timeout lost replies under load (docs/benchmarks.md): the running SuperLink's
    database connections use server/superlink_main.py's, read back from the live process's settings."""
    import subprocess
    import sys

    from fedinterest.server.superlink_main import BUSY_TIMEOUT_MS

    script = "import fedinterest.server.superlink_main as m, sys; sys.argv = ['flower-superlink', '--version']; m.main()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1.41" in (done.stdout + done.stderr)
    probe = ("import fedinterest.server.superlink_main as m, flwr.superlink.cli as c; c.flower_superlink = lambda: None; m.main();"
             "import flwr.supercore.sql_mixin as s; print(dict(s.SQLITE_PRAGMAS)['busy_timeout'])")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip() == str(BUSY_TIMEOUT_MS)
    assert server.database.is_file()  # and the fixture's SuperLink, started this way, is up
