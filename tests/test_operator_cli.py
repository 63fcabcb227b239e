"""`fedinterest server ...` without a running SuperLink: init, config, keys, bad input, status/report/export of a run directory."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from operator_helpers import write_catalogue, write_ec_key, write_rsa_public_key
from typer.testing import CliRunner

from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import FinalReport
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.deployment import load_deployment
from fedinterest.server.superlink import superlink_command
from fedinterest.simulations.cli import app

runner = CliRunner()
COMMANDS = ("init", "start", "enroll", "revoke", "devices", "run", "status", "stop", "export", "report")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, ["server", *args], env=env)


@pytest.fixture()
def deployment_dir(tmp_path: Path) -> Path:
    catalogue = write_catalogue(tmp_path / "items.txt", 40)
    result = invoke("init", str(tmp_path / "dep"), "--san", "127.0.0.1", "--san", "fl.example.org", "--catalogue", str(catalogue), "--host", "127.0.0.1", "--port", "1")
    assert result.exit_code == 0, result.output
    return tmp_path / "dep"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_init_writes_ca_server_certificate_config_and_empty_enrolment(tmp_path: Path) -> None:
    catalogue = write_catalogue(tmp_path / "items.txt", 40)
    result = invoke("init", str(tmp_path / "dep"), "--san", "192.0.2.7", "--san", "fl.example.org", "--catalogue", str(catalogue), "--port", "9555", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    root = tmp_path / "dep"
    for key in ("tls/ca.key", "tls/server.key"):
        assert stat.S_IMODE((root / key).stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((root / "tls/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((root / "tls/server.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"192.0.2.7", "127.0.0.1"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert sorted(facts["sans"]) == sorted(["192.0.2.7", "fl.example.org", "127.0.0.1", "localhost"])
    assert (root / "catalogue.txt").read_text() == catalogue.read_text()
    assert json.loads((root / "devices.json").read_text()) == []
    deployment = load_deployment(root)
    assert deployment.server.port == 9555 and deployment.server.host == "127.0.0.1"
    # Run defaults are RunConfig's (= pyproject's), without the keys `server run` sets.
    assert deployment.run_defaults["num-server-rounds"] == RunConfig().num_server_rounds
    assert "dataset" not in deployment.run_defaults and "run-dir" not in deployment.run_defaults


def test_init_binds_loopback_by_default_and_warns_when_exposed(tmp_path: Path) -> None:
    """Issue 16, item 3: the Control API shares the port, so nothing listens beyond loopback unless asked."""
    quiet = invoke("init", str(tmp_path / "local"), "--port", "9555")
    assert quiet.exit_code == 0, quiet.output
    assert load_deployment(tmp_path / "local").server.host == "127.0.0.1"
    assert "warning" not in quiet.output and "loopback only" in quiet.output
    assert "--host" in superlink_command(load_deployment(tmp_path / "local")) and "127.0.0.1" in superlink_command(load_deployment(tmp_path / "local"))
    exposed = invoke("init", str(tmp_path / "exposed"), "--host", "0.0.0.0", "--port", "9555")
    assert exposed.exit_code == 0, exposed.output
    assert "warning:" in exposed.output and "Control API" in exposed.output and "Firewall" in exposed.output
    assert load_deployment(tmp_path / "exposed").server.host == "0.0.0.0"


def test_flower_connection_trusts_the_ca(deployment_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(deployment_dir / "flwr-home"))
    connection = read_superlink_connection()
    assert connection.address == "127.0.0.1:1"
    assert not connection.insecure
    assert connection.root_certificates == str((deployment_dir / "tls/ca.crt").resolve())


def test_start_command_has_tls_auth_and_database_in_dir(deployment_dir: Path) -> None:
    deployment = load_deployment(deployment_dir)
    command = superlink_command(deployment)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    assert command[command.index("--ssl-ca-certfile") + 1] == str(deployment.ca_cert)
    assert command[command.index("--ssl-certfile") + 1] == str(deployment.server_cert)
    assert command[command.index("--ssl-keyfile") + 1] == str(deployment.server_key)
    assert command[command.index("--database") + 1] == str(deployment_dir.resolve() / "state" / "superlink.db")
    assert command[command.index("--port") + 1] == "1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--san", "not a name"], "not an IP address or a DNS name"),
        (["--san", "-bad.example"], "not an IP address or a DNS name"),
        (["--port", "70000"], "port must be"),
        (["--host", "no such host!"], "not an IP address or a DNS name"),
        (["--catalogue", "missing.txt"], "missing.txt: no such file"),
    ],
)
def test_init_bad_input_leaves_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("init", str(tmp_path / "dep"), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "dep").exists()


def test_init_bad_catalogue_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "items.txt"
    bad.write_text("a\n\nb\n")
    result = invoke("init", str(tmp_path / "dep"), "--catalogue", str(bad))
    assert result.exit_code == 2
    assert "blank line" in result.output
    assert not (tmp_path / "dep").exists()


def test_init_refuses_an_existing_deployment(deployment_dir: Path) -> None:
    before = (deployment_dir / "tls/ca.crt").read_bytes()
    result = invoke("init", str(deployment_dir))
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (deployment_dir / "tls/ca.crt").read_bytes() == before


def test_commands_name_a_missing_deployment(tmp_path: Path) -> None:
    for args in (["start"], ["devices"], ["status"], ["run"], ["revoke", "x"], ["stop", "1"], ["report", "1"]):
        result = invoke(*args, "--dir", str(tmp_path / "nowhere"))
        assert result.exit_code == 2, args
        assert "not a deployment directory" in result.output, args
    result = invoke("devices", env={"FEDINTEREST_SERVER_DIR": ""})
    assert result.exit_code == 2
    assert "--dir DIR" in result.output


def test_deployment_dir_from_environment(deployment_dir: Path) -> None:
    result = invoke("devices", "--json", env={"FEDINTEREST_SERVER_DIR": str(deployment_dir)})
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["devices"] == []
    assert "does not answer" in payload["status_error"]  # no SuperLink: said, not hidden


def test_bad_config_file_is_named(deployment_dir: Path) -> None:
    config = deployment_dir / "fedinterest-server.toml"
    config.write_text(config.read_text() + "no-such-key = 1\n")
    result = invoke("devices", "--dir", str(deployment_dir))
    assert result.exit_code == 2
    assert "fedinterest-server.toml" in result.output and "no-such-key" in result.output


def test_enroll_bad_input_is_refused_before_the_superlink(deployment_dir: Path, tmp_path: Path) -> None:
    private, public = write_ec_key(tmp_path, "dev")
    cases = [
        ([str(tmp_path / "missing.pub"), "--name", "a"], "no such public key file"),
        ([str(private), "--name", "a"], "this is a private key"),
        ([str(write_rsa_public_key(tmp_path / "rsa.pub")), "--name", "a"], "EC key on a NIST curve"),
        ([str(write_catalogue(tmp_path / "junk.pub", 2)), "--name", "a"], "not an OpenSSH public key"),
        ([str(public), "--name", "bad name!"], "device name"),
    ]
    for args, message in cases:
        result = invoke("enroll", *args, "--dir", str(deployment_dir))
        assert result.exit_code == 2, args
        assert message in result.output, (args, result.output)
    # A good key with the SuperLink down: the error names the address to start.
    result = invoke("enroll", str(public), "--name", "a", "--dir", str(deployment_dir))
    assert result.exit_code == 2
    assert "does not answer at https://127.0.0.1:1" in result.output
    assert json.loads((deployment_dir / "devices.json").read_text()) == []


def test_revoke_unknown_name(deployment_dir: Path) -> None:
    result = invoke("revoke", "nobody", "--dir", str(deployment_dir))
    assert result.exit_code == 2
    assert "no enrolled device called 'nobody'" in result.output


def test_run_refuses_keys_it_sets_and_unknown_keys(deployment_dir: Path) -> None:
    from fedinterest.server.run_admin import RunError, resolve_run_config

    deployment = load_deployment(deployment_dir)
    config = resolve_run_config(deployment, ["num-server-rounds=2", "dim=16"], deployment_dir / "runs" / "x")
    assert config.deployed and config.num_items == 40 and config.num_server_rounds == 2 and config.dim == 16
    assert config.run_dir == str(deployment_dir / "runs" / "x")
    for item, message in (("dataset=ml-100k", "set by `fedinterest server run`"), ("num-items=3", "set by"), ("no-such=1", "no-such"), ("dim=abc", "not a valid int"), ("dim", "expected key=value")):
        with pytest.raises(RunError, match=message):
            resolve_run_config(deployment, [item], deployment_dir / "runs" / "x")
    result = invoke("run", "--set", "dataset=ml-100k", "--dir", str(deployment_dir))
    assert result.exit_code == 2  # the SuperLink is down, or the key is refused: either way nothing is submitted
    assert list((deployment_dir / "runs").iterdir()) == []


def test_run_needs_a_catalogue(tmp_path: Path) -> None:
    assert invoke("init", str(tmp_path / "dep"), "--host", "127.0.0.1", "--port", "1").exit_code == 0
    result = invoke("run", "--dir", str(tmp_path / "dep"))
    assert result.exit_code == 2
    assert "catalogue.txt: no catalogue" in result.output


def _fake_run(deployment_dir: Path, finished: bool = True) -> Path:
    """A run directory as `server run` and the ServerApp leave it (without Flower)."""
    import hashlib

    deployment = load_deployment(deployment_dir)
    run_dir = deployment.runs_dir / "run-20260101-000000"
    run_dir.mkdir()
    config = RunConfig(dataset="deployed", num_items=40, num_server_rounds=2, dim=16, max_len=20, run_dir=str(run_dir))
    record = {"run_id": 1234, "submitted_at": "2026-01-01T00:00:00+00:00", "run_config": config.to_flower(),
              "catalogue_sha256": hashlib.sha256(deployment.catalogue.read_bytes()).hexdigest()}
    (run_dir / "run.json").write_text(json.dumps(record))
    rows = [
        {"round": 1, "sampled": 3, "answered": 3, "refused": 0, "failed": 0, "rejected": 0, "train_loss": 3.5, "epsilon_max": 0.5, "epsilon_mean": 0.4, "hr@10": None, "ndcg@10": None, "seconds": 1.0},
        {"round": 2, "sampled": 3, "answered": 2, "refused": 1, "failed": 0, "rejected": 0, "train_loss": 3.1, "epsilon_max": 0.9, "epsilon_mean": 0.7, "hr@10": 0.3, "ndcg@10": 0.2, "seconds": 1.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: 2 if finished else 1]))
    if finished:
        model = InterestModel(config.model_config(40))
        arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        ckpt.save(run_dir, ckpt.Checkpoint(round=2, arrays=arrays, config=ckpt.hashed_config(config)))
        final = {"rounds": 2, "valid": {"hr@10": 0.3, "ndcg@10": 0.2}, "test": {"hr@10": 0.25, "ndcg@10": 0.15},
                 "privacy": {"device_epsilon_max": 0.9, "device_epsilon_mean": 0.7, "devices_reporting": 3, "unit": "u"}, "counts": {"aggregated": 5}}
        (run_dir / "final.json").write_text(json.dumps(final))
    return run_dir


def test_status_from_the_run_directory_when_flower_is_unreachable(deployment_dir: Path) -> None:
    _fake_run(deployment_dir, finished=False)
    result = invoke("status", "--dir", str(deployment_dir), "--json")
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert state["run_id"] == "1234" and state["status"] is None and not state["completed"]
    assert "does not answer" in state["flower"]["error"]
    assert state["rounds_done"] == 1 and state["rounds_planned"] == 2
    assert state["devices"]["answered"] == 3 and state["privacy"]["epsilon_max"] == 0.5
    text = invoke("status", "1234", "--dir", str(deployment_dir))
    assert text.exit_code == 0 and "rounds: 1 of 2" in text.output
    missing = invoke("status", "999", "--dir", str(deployment_dir))
    assert missing.exit_code == 2 and "no run '999'" in missing.output


def test_status_while_the_round_loop_appends_a_row(deployment_dir: Path) -> None:
    """A half-written last row (the ServerApp mid-append) is not read yet; `server status` still answers."""
    run_dir = _fake_run(deployment_dir, finished=False)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 2, "sampled": 3, "answ')
    result = invoke("status", "--dir", str(deployment_dir), "--json")
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert state["rounds_done"] == 1 and state["latest_round"]["round"] == 1


def test_report_writes_plots_and_table(deployment_dir: Path) -> None:
    run_dir = _fake_run(deployment_dir)
    result = invoke("report", "1234", "--dir", str(deployment_dir))
    assert result.exit_code == 0, result.output
    assert "| 2 of 2 | 6 | 5 | 1 | 0 | 0 | 0.9 | 0.7 |" in result.output
    for name in ("report.md", "ndcg.png", "epsilon.png"):
        assert (run_dir / name).stat().st_size > 0
    facts = json.loads(invoke("report", run_dir.name, "--dir", str(deployment_dir), "--json").stdout)
    assert facts["test"]["ndcg@10"] == 0.15 and facts["finished"]


def test_export_writes_a_bundle_a_device_can_load(deployment_dir: Path, tmp_path: Path) -> None:
    from fedinterest.common.bundle import load_bundle

    _fake_run(deployment_dir)
    out = tmp_path / "model.bundle"
    result = invoke("export", "1234", "--out", str(out), "--dir", str(deployment_dir), "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["round"] == 2
    bundle = load_bundle(out)
    assert len(bundle.catalogue) == 40 and bundle.catalogue.item(1) == "item-1"
    assert bundle.model_config.dim == 16 and bundle.model_config.num_items == 40
    card = bundle.card
    assert card["privacy"]["device_epsilon_max"] == 0.9 and card["privacy"]["delta"] == 1e-5
    assert card["run"]["rounds"] == 2 and card["run"]["flower_run_id"] == "1234"
    assert card["evaluation"]["test"]["ndcg@10"] == 0.15
    assert bundle.ranker.scores(np.array([1, 2, 3])).shape == (41,)  # index 0 is padding


def test_export_refuses_an_unfinished_run(deployment_dir: Path, tmp_path: Path) -> None:
    _fake_run(deployment_dir, finished=False)
    result = invoke("export", "1234", "--out", str(tmp_path / "b"), "--dir", str(deployment_dir))
    assert result.exit_code == 2 and "has not finished" in result.output
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_changed_catalogue(deployment_dir: Path, tmp_path: Path) -> None:
    _fake_run(deployment_dir)
    write_catalogue(deployment_dir / "catalogue.txt", 41)
    result = invoke("export", "1234", "--out", str(tmp_path / "b"), "--dir", str(deployment_dir))
    assert result.exit_code == 2 and "changed since run" in result.output


def test_report_shows_the_user_level_epsilon_of_a_layer_two_run(deployment_dir: Path) -> None:
    run_dir = _fake_run(deployment_dir)
    final = json.loads((run_dir / "final.json").read_text())
    final["privacy"]["user_level"] = {"epsilon": 3.25, "delta": 0.001, "rounds_accounted": 2, "epsilon_budget": 4.0}
    final["stopped_early"] = "user-epsilon-budget"
    (run_dir / "final.json").write_text(json.dumps(final))
    result = invoke("report", "1234", "--dir", str(deployment_dir))
    assert result.exit_code == 0, result.output
    assert "epsilon 3.25 at delta 0.001 after 2 rounds, budget 4; noise: added by the server; the run stopped early (user-epsilon-budget)" in result.output
    facts = json.loads(invoke("report", run_dir.name, "--dir", str(deployment_dir), "--json").stdout)
    assert facts["user_level"]["epsilon"] == 3.25


def test_model_card_names_layer_two_when_the_run_used_it(deployment_dir: Path) -> None:
    from fedinterest.server.export import model_card

    run_dir = _fake_run(deployment_dir)
    record = json.loads((run_dir / "run.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    deployment = load_deployment(deployment_dir)
    assert "2: user-level" not in model_card(deployment, run_dir, record, FinalReport(final), 2, None)["privacy"]["layer"]
    record["run_config"]["user-noise-multiplier"] = 0.8
    final["privacy"]["user_level"] = {"epsilon": 3.25, "delta": 0.001}
    card = model_card(deployment, run_dir, record, FinalReport(final), 2, None)
    assert card["privacy"]["layer"].startswith("1: on-device DP-SGD") and "2: user-level DP-FedAvg" in card["privacy"]["layer"]
    assert card["privacy"]["user_level"]["epsilon"] == 3.25


def _nothing_trained(run_dir: Path) -> None:
    """Rewrite a finished fake run as one in which every device refused or failed."""
    rows = [
        {"round": r, "sampled": 3, "answered": 2, "refused": 2, "failed": 1, "rejected": 0, "empty": 0, "train_loss": None,
         "epsilon_max": 8.5, "epsilon_mean": 8.2, "hr@10": None, "ndcg@10": None, "seconds": 1.0} for r in (1, 2)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = json.loads((run_dir / "final.json").read_text())
    final["counts"] = {"sampled": 6, "answered": 4, "refused": 4, "failed": 2, "rejected": 0, "empty": 0, "aggregated": 0, "rounds_without_update": 2}
    (run_dir / "final.json").write_text(json.dumps(final))


def test_a_run_in_which_no_device_trained_is_reported_as_such(deployment_dir: Path) -> None:
    """Issue 16, item 2: Flower's "completed" with nothing aggregated is marked, in status and report."""
    run_dir = _fake_run(deployment_dir)
    trained = json.loads(invoke("status", "--dir", str(deployment_dir), "--json").stdout)
    assert trained["trained"] is True and trained["outcome"] == "trained" and trained["outcome_why"] is None
    _nothing_trained(run_dir)
    state = json.loads(invoke("status", "--dir", str(deployment_dir), "--json").stdout)
    assert state["trained"] is False and state["outcome"] == "nothing-trained" and not state["completed"]
    assert "4 refused" in state["outcome_why"] and "2 failed" in state["outcome_why"]
    text = invoke("status", "--dir", str(deployment_dir))
    assert text.exit_code == 0 and "warning: no device trained" in text.output
    report = invoke("report", "1234", "--dir", str(deployment_dir))
    assert report.exit_code == 0 and "**Nothing trained.**" in report.output
    facts = json.loads(invoke("report", "1234", "--dir", str(deployment_dir), "--json").stdout)
    assert facts["outcome"] == "nothing-trained" and facts["run_id"] == "1234"


def test_submitting_warns_when_device_budgets_cannot_cover_the_rounds(deployment_dir: Path) -> None:
    """Issue 16, item 2: the defaults (noise 1, epsilon 8, 10 rounds) let a small device train only 2 rounds."""
    from fedinterest.server.run_admin import check_run

    deployment = load_deployment(deployment_dir)
    _, warnings = check_run(deployment, [])
    assert len(warnings) == 1 and "can train only 2 of the 10 rounds" in warnings[0] and "num-server-rounds" in warnings[0]
    assert check_run(deployment, ["num-server-rounds=2"])[1] == ()
    assert check_run(deployment, ["noise-multiplier=0"])[1] == ()  # no DP: nothing to spend
    # A device that already spent most of its budget in an earlier run (the run's checkpoint tally) is named.
    run_dir = _fake_run(deployment_dir)
    saved = ckpt.latest(run_dir)
    ckpt.save(run_dir, ckpt.Checkpoint(round=saved.round, arrays=saved.arrays, config=saved.config, privacy={"device_epsilon_max": {"77": 7.5}}))
    devices = [{"name": "phone-1", "public_key": "k", "key_sha256": "SHA256:x", "node_id": 77, "enrolled_at": "2026-01-01T00:00:00+00:00"}]
    (deployment_dir / "devices.json").write_text(json.dumps(devices))
    _, warnings = check_run(deployment, ["num-server-rounds=2"])
    assert len(warnings) == 1 and "device phone-1 already spent epsilon 7.5" in warnings[0] and "at most 0 more" in warnings[0]
    # `server run` prints the warning before it tries the SuperLink (down here).
    result = invoke("run", "--dir", str(deployment_dir))
    assert result.exit_code == 2 and "warning: the devices' privacy budgets cannot cover this run" in result.output
