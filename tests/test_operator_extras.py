"""Issue 16, item 6, on real small files: a catalogue by popularity with its baseline, reasons per
device from the ServerApp's log lines, a bundle from a centralized run, `.json` read as JSON lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedinterest.common.bundle import load_bundle
from fedinterest.common.catalogue import load_catalogue
from fedinterest.server.run_reasons import parse_reasons
from fedinterest.simulations.cli import app

runner = CliRunner()


def _log_file(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows), encoding="utf-8")
    return path


def test_catalogue_by_popularity_with_its_baseline_reaches_status_and_report(tmp_path: Path) -> None:
    rows = [(f"u{u}", item, 1000 * u + k) for u in range(1, 7) for k, item in enumerate(["b", "c", "a", "b", "d"][: 3 + u % 3])]
    rows += [("u9", "e", 1), ("u9", "b", 2), ("u9", "c", 3)]
    source = _log_file(tmp_path / "log.csv", rows)
    out = tmp_path / "catalogue.txt"
    built = runner.invoke(app, ["server", "catalogue", str(source), "--out", str(out), "--json"])
    assert built.exit_code == 0, built.output
    facts = json.loads(built.stdout)
    counts = {item: sum(1 for _, i, _ in rows if i == item) for item in "abcde"}
    assert list(load_catalogue(out).ids) == sorted(counts, key=lambda i: (-counts[i], [r[1] for r in rows].index(i)))
    assert facts["items"] == 5 and facts["users_evaluated"] == 7 and 0 <= facts["popularity_test"]["ndcg@10"] <= 1
    again = runner.invoke(app, ["server", "catalogue", str(source), "--out", str(out)])
    assert again.exit_code == 2 and "never overwritten" in again.output
    # The deployment made from it shows the baseline beside the run.
    assert runner.invoke(app, ["server", "init", str(tmp_path / "dep"), "--catalogue", str(out), "--port", "1"]).exit_code == 0
    from test_operator_cli import _fake_run

    _fake_run(tmp_path / "dep")
    (tmp_path / "dep" / "catalogue.txt").write_text(out.read_text())  # _fake_run's catalogue check uses the deployment's file
    state = json.loads(runner.invoke(app, ["server", "status", "--dir", str(tmp_path / "dep"), "--json"]).stdout)
    assert state["popularity_baseline"]["popularity_test"] == facts["popularity_test"]
    report = runner.invoke(app, ["server", "report", "1234", "--dir", str(tmp_path / "dep")])
    assert report.exit_code == 0 and "popularity baseline*" in report.output and "not on the devices' histories" in report.output


def test_reasons_per_device_from_the_server_apps_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    # The exact lines server/rounds.py logs, through its own logger.
    log = logging.getLogger("flwr.fedinterest")
    with caplog.at_level(logging.INFO, logger="flwr.fedinterest"):
        log.warning("fedinterest: round %d: node %d %s: %s", 1, 111, "failed", "error 0: ClientApp raised")
        log.info("fedinterest: round %d: node %d refused: reported epsilon %s", 2, 222, 8.1)
        log.info("fedinterest: round %d: node %d refused: reported epsilon %s", 3, 222, 8.1)
        log.warning("fedinterest: round %d: node %d %s: %s", 3, 333, "rejected", "update norm 9 exceeds max-update-norm 1")
    text = "\n".join(f"\x1b[93mWARNING \x1b[0m:   {r.getMessage()}" for r in caplog.records)
    lines = parse_reasons(text, {111: "phone-1", 222: "phone-2"})
    assert lines == [
        "phone-1 (node 111) failed in round(s) 1: error 0: ClientApp raised",
        "phone-2 (node 222) refused in round(s) 2, 3: reported epsilon 8.1",
        "node 333 (not in the enrolment table) rejected in round(s) 3: update norm 9 exceeds max-update-norm 1",
    ]


def test_a_centralized_run_exports_a_bundle_a_device_ranks_with(tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "centralized", "--synthetic-users", "60", "--synthetic-items", "200", "--epochs", "2", "--max-len", "10", "--dim", "8",
        "--blocks", "1", "--out", str(tmp_path / "runs"), "--export-bundle", str(tmp_path / "c.bundle"), "--json",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    bundle = load_bundle(tmp_path / "c.bundle")
    assert bundle.card["privacy"]["dp"] is False and bundle.card["evaluation"]["popularity_test"] == payload["popularity_test"]
    catalogue = Path(payload["bundle"]["catalogue"])
    assert list(load_catalogue(catalogue).ids) == list(bundle.catalogue.ids) and len(bundle.catalogue) == bundle.model_config.num_items
    # A device made with that catalogue installs it and ranks.
    assert runner.invoke(app, ["device", "init", str(tmp_path / "dev"), "--catalogue", str(catalogue)]).exit_code == 0
    assert runner.invoke(app, ["device", "install-bundle", str(tmp_path / "c.bundle"), "--dir", str(tmp_path / "dev")]).exit_code == 0
    ranked = json.loads(runner.invoke(app, ["device", "recommend", "--dir", str(tmp_path / "dev"), "-k", "3", "--json"]).stdout)
    assert ranked["model"]["kind"] == "bundle" and len(ranked["items"]) == 3
    assert np.isfinite([i["score"] for i in ranked["items"]]).all()


def test_a_json_file_is_read_as_json_lines(tmp_path: Path) -> None:
    catalogue = tmp_path / "c.txt"
    catalogue.write_text("a\nb\nc\n")
    assert runner.invoke(app, ["device", "init", str(tmp_path / "dev"), "--catalogue", str(catalogue)]).exit_code == 0
    lines = tmp_path / "export.json"
    lines.write_text("".join(json.dumps({"user": "u", "item": i, "timestamp": t}) + "\n" for t, i in enumerate("abc")))
    added = runner.invoke(app, ["device", "ingest", str(lines), "--dir", str(tmp_path / "dev"), "--json"])
    assert added.exit_code == 0, added.output and json.loads(added.stdout)["rows_added"] == 3
    array = tmp_path / "array.json"
    array.write_text("[\n" + ",\n".join(json.dumps({"user": "u", "item": "a", "timestamp": 9})) + "\n]\n")
    refused = runner.invoke(app, ["device", "ingest", str(array), "--dir", str(tmp_path / "dev")])
    assert refused.exit_code == 2 and "a JSON array; interactions are read as JSON lines" in refused.output
