"""`fedinterest device ...` end to end through typer's CliRunner, on small real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from device_helpers import TINY_RUN, item_ids, user_rows, write_csv
from tls_stub import HealthServer, write_ca_and_server
from typer.testing import CliRunner

from fedinterest.client.device_cli import app
from fedinterest.client.device_dir import open_device_dir
from fedinterest.client.ledger import LedgerEntry, PrivacyLedger
from fedinterest.client.supernode import supernode_launch
from fedinterest.common.bundle import write_bundle
from fedinterest.common.catalogue import write_catalogue
from fedinterest.common.model import InterestModel, ModelConfig

COMMANDS = ["init", "ingest", "start", "install-bundle", "recommend", "budget", "serve", "status", "export", "forget", "policy"]


def _invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    catalogue = write_catalogue(tmp_path / "catalogue.txt", item_ids(30))
    result = _invoke("init", str(tmp_path / "dev"), "--catalogue", str(catalogue), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["catalogue_items"] == 30 and Path(payload["public_key"]).is_file()
    return tmp_path / "dev"


def test_init_refuses_an_existing_device(device_dir: Path, tmp_path: Path) -> None:
    result = _invoke("init", str(device_dir), "--catalogue", str(tmp_path / "catalogue.txt"))
    assert result.exit_code == 2 and "refusing to overwrite" in result.output


def test_ingest_recommend_budget_install_bundle(device_dir: Path, tmp_path: Path) -> None:
    history = write_csv(tmp_path / "h.csv", user_rows("u1", ["m1", "m5", "m7", "zz"]) + user_rows("u2", ["m2", "m3", "m4"]))
    env = {"FEDINTEREST_DEVICE_DIR": str(device_dir)}  # the directory from the environment
    refused = _invoke("ingest", str(history), env=env)
    assert refused.exit_code == 2 and "pass --user ID" in refused.output
    first = json.loads(_invoke("ingest", str(history), "--user", "u1", "--json", env=env).output)
    assert first["rows_added"] == 4 and first["unknown_items"] == 1
    again = _invoke("ingest", str(history), "--user", "u1", env=env)
    assert again.exit_code == 0 and "already imported" in again.output

    no_model = json.loads(_invoke("recommend", "--dir", str(device_dir), "-k", "3", "--json").output)
    assert no_model["model"]["kind"] == "fallback" and [i["item_id"] for i in no_model["items"]] == ["m2", "m3", "m4"]
    assert "no model yet: ranked by catalogue order" in _invoke("recommend", "--dir", str(device_dir)).output

    torch.manual_seed(0)
    config = ModelConfig(num_items=30, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"})
    bundle = write_bundle(tmp_path / "model.bundle", state_dict=InterestModel(config).state_dict(), model_config=config,
                          catalogue_ids=item_ids(30), model_card={"rounds": 2})
    bad = _invoke("install-bundle", str(bundle), "--dir", str(device_dir), "--sha256", "0" * 64)
    assert bad.exit_code == 2 and "SHA-256 is" in bad.output
    installed = json.loads(_invoke("install-bundle", str(bundle), "--dir", str(device_dir), "--json").output)
    assert installed["card"] == {"rounds": 2}

    ranked = json.loads(_invoke("recommend", "--dir", str(device_dir), "-k", "4", "--json").output)
    assert len(ranked["items"]) == 4 and not {i["item_id"] for i in ranked["items"]} & {"m1", "m5", "m7"}
    assert ranked["model"]["kind"] == "bundle" and ranked["history_unknown"] == 1
    assert "1. m" in _invoke("recommend", "--dir", str(device_dir)).output

    with PrivacyLedger(device_dir / "store.sqlite") as ledger:
        ledger.record(LedgerEntry(3, 1, 1.0, 0.5, 4))
    spent = json.loads(_invoke("budget", "--dir", str(device_dir), "--json").output)
    assert spent["rounds"] == 1 and spent["epsilon"] == pytest.approx(7.4097336, rel=1e-6)
    assert spent["delta"] == 1e-5 and spent["remaining"] == pytest.approx(8.0 - spent["epsilon"])
    assert "at delta 1e-05" in _invoke("budget", "--dir", str(device_dir)).output


def test_commands_on_an_uninitialised_dir_fail_clearly(tmp_path: Path) -> None:
    for args in (["recommend"], ["budget"], ["serve"], ["start", "--server", "127.0.0.1:9092", "--ca", "ca.crt"]):
        result = _invoke(*args, "--dir", str(tmp_path / "none"))
        assert result.exit_code == 2 and "no device directory here" in result.output, args


def test_serve_refuses_a_non_local_address(device_dir: Path) -> None:
    result = _invoke("serve", "--dir", str(device_dir), "--address", "0.0.0.0:50151")
    assert result.exit_code == 2 and "loopback" in result.output


def test_start_runs_flowers_supernode_with_tls_the_key_and_the_store(device_dir: Path, tmp_path: Path) -> None:
    ca, server_cert, server_key = write_ca_and_server(tmp_path)
    device = open_device_dir(device_dir)
    launch = supernode_launch(device, server="127.0.0.1:9092", ca=ca, runtime_port=50999)
    argv = launch.argv
    assert Path(argv[0]).name == "flower-supernode"
    assert argv[argv.index("--root-certificates") + 1] == str(ca.resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(device.private_key.resolve())
    assert argv[argv.index("--node-config") + 1] == f"history-db='{device.store_path.resolve()}'"
    assert "--insecure" not in argv
    assert launch.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and launch.env["FLWR_HOME"] == str(device.flwr_home.resolve())
    # Flower parses the node config back to the store path.
    from flwr.common.config import parse_config_args

    assert parse_config_args([argv[argv.index("--node-config") + 1]]) == {"history-db": str(device.store_path.resolve())}
    env = {**os.environ, "PATH": os.defpath}
    script = (
        "import sys; from fedinterest.client.device_cli import app; "
        "sys.argv = ['device', 'start', '--dir', sys.argv[1], '--server', sys.argv[3], '--ca', sys.argv[2], "
        "'--max-retries', '1', '--max-wait-time', '3']; app()"
    )
    # Nothing listening: the address and the reason are named, and it gives up (issue 16, item 5).
    result = subprocess.run([sys.executable, "-c", script, str(device_dir), str(ca), "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "the SuperLink at 127.0.0.1:1 did not answer" in result.stderr and "connection refused" in result.stderr
    assert "Traceback" not in result.stderr

    # A server that answers the check: the real SuperNode starts; stopped with SIGTERM while it
    # retries the Fleet API forever, the SuperNode goes too, nothing is orphaned.
    forever = script.replace("'--max-retries', '1', '--max-wait-time', '3'", "'--max-wait-time', '600'")
    with HealthServer(server_cert, server_key) as port:
        process = subprocess.Popen([sys.executable, "-c", forever, str(device_dir), str(ca), f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "Starting Flower SuperNode" in line:
                break
        try:
            deadline = time.monotonic() + 60
            while not _supernodes_of(device) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _supernodes_of(device) and process.poll() is None, "".join(seen)
            process.terminate()
            process.wait(timeout=120)
            deadline = time.monotonic() + 60
            while _supernodes_of(device) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not _supernodes_of(device)
        finally:
            for pid in _supernodes_of(device):  # only when the assertion failed: leave nothing running
                os.kill(pid, signal.SIGKILL)
            if process.poll() is None:
                process.kill()


def _supernodes_of(device) -> list[int]:
    """PIDs of live flower-supernode processes using this device's key."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(") ")[-1][:1]
        except (OSError, ValueError):
            continue
        if state != "Z" and any(b"flower-supernode" in part for part in cmdline) and str(device.private_key.resolve()).encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_status_export_and_forget(device_dir: Path, tmp_path: Path) -> None:
    """Issue 16, item 7: a device owner sees what the device holds, takes it out, and deletes it."""
    from fedinterest.client.device_session import DeviceSession

    fresh = json.loads(_invoke("status", "--dir", str(device_dir), "--json").output)
    assert fresh["history"]["interactions"] == 0 and fresh["model"] is None and fresh["connection"]["state"].startswith("never started")
    assert fresh["key"]["fingerprint"].startswith("SHA256:") and fresh["budget"]["rounds"] == 0
    history = write_csv(tmp_path / "h.csv", user_rows("u1", ["m1", "m5", "m7", "zz"]))
    _invoke("ingest", str(history), "--dir", str(device_dir))
    torch.manual_seed(0)
    config = ModelConfig(num_items=30, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"})
    bundle = write_bundle(tmp_path / "m.bundle", state_dict=InterestModel(config).state_dict(), model_config=config, catalogue_ids=item_ids(30), model_card={})
    _invoke("install-bundle", str(bundle), "--dir", str(device_dir))
    with PrivacyLedger(device_dir / "store.sqlite") as ledger:
        ledger.record(LedgerEntry(3, 1, 1.0, 0.5, 4))
    status = json.loads(_invoke("status", "--dir", str(device_dir), "--json").output)
    assert status["user_id"] == "u1" and status["history"] == {"interactions": 4, "in_catalogue": 3, "outside_catalogue": 1, "imports": 1, "trainable": True}
    assert status["model"]["kind"] == "bundle" and status["budget"]["rounds"] == 1
    text = _invoke("status", "--dir", str(device_dir)).output
    assert "history: 4 interactions" in text and "model: bundle" in text and "connection: never started" in text

    out = tmp_path / "export.json"
    exported = json.loads(_invoke("export", "--dir", str(device_dir), "--out", str(out), "--json").output)
    assert exported["interactions"] == 4 and exported["ledger_rounds"] == 1
    document = json.loads(out.read_text())
    assert [e["item_id"] for e in document["history"]] == ["m1", "m5", "m7", "zz"] and document["ledger"][0]["run_id"] == "3"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    again = _invoke("export", "--dir", str(device_dir), "--out", str(out))
    assert again.exit_code == 2 and "never overwrites" in again.output

    refused = _invoke("forget", "--dir", str(device_dir))
    assert refused.exit_code == 2 and "--yes" in refused.output
    with DeviceSession(device_dir):  # `device start` running: the store is not changed under it
        busy = _invoke("forget", "--dir", str(device_dir), "--yes")
        assert busy.exit_code == 2 and "is running" in busy.output
    removed = json.loads(_invoke("forget", "--dir", str(device_dir), "--yes", "--json").output)
    assert removed == {"store_events": 4, "store_imports": 1, "store_models": 1}
    after = json.loads(_invoke("status", "--dir", str(device_dir), "--json").output)
    assert after["history"]["interactions"] == 0 and after["model"] is None and after["user_id"] is None
    assert after["budget"]["rounds"] == 1  # the ledger is kept: that epsilon stays spent
    assert after["connection"]["state"] == "stopped"  # the session above ended cleanly
    _invoke("ingest", str(history), "--dir", str(device_dir))  # the same file imports again after forget
    assert json.loads(_invoke("status", "--dir", str(device_dir), "--json").output)["history"]["interactions"] == 4
    reset = json.loads(_invoke("forget", "--dir", str(device_dir), "--yes", "--reset-ledger", "--json").output)
    assert reset["ledger_steps"] == 1
    assert json.loads(_invoke("budget", "--dir", str(device_dir), "--json").output)["rounds"] == 0
