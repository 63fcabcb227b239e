"""The device's privacy ledger: epsilon from Opacus's RDP accountant, durable, charged once per round."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant

from fedinterest.client.ledger import (
    DEVICE_USER,
    STATE_KEY,
    Charge,
    LedgerEntry,
    PrivacyLedger,
    open_device_ledger,
    rdp_epsilon,
)

DELTA = 1e-5


def _entry(server_round: int, sigma: float = 1.0, q: float = 0.5, steps: int = 2, run_id: int = 1) -> LedgerEntry:
    return LedgerEntry(run_id=run_id, server_round=server_round, noise_multiplier=sigma, sample_rate=q, steps=steps)


def _opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(delta=DELTA)


def test_fixed_expected_epsilon() -> None:
    """(sigma=1, q=0.5, 4 steps, delta=1e-5): the figure Opacus's RDP accountant gives, pinned."""
    ledger = PrivacyLedger(":memory:")
    assert ledger.epsilon(DELTA) == 0.0
    ledger.record(_entry(1, steps=4))
    assert ledger.epsilon(DELTA) == pytest.approx(_opacus_epsilon([(1.0, 0.5, 4)]), rel=1e-12)
    assert ledger.epsilon(DELTA) == pytest.approx(7.4097336, rel=1e-6)


def test_epsilon_grows_with_rounds_and_composes_like_one_long_run() -> None:
    ledger = PrivacyLedger(":memory:")
    figures = []
    for server_round in (1, 2, 3):
        ledger.record(_entry(server_round))
        figures.append(ledger.epsilon(DELTA))
    assert figures == sorted(figures) and len(set(figures)) == 3
    assert figures == pytest.approx([5.3770215, 7.4097336, 8.9817377], rel=1e-6)
    # Three rounds of 2 steps compose exactly as 6 steps of one accountant.
    assert figures[-1] == pytest.approx(_opacus_epsilon([(1.0, 0.5, 6)]), rel=1e-9)


def test_round_trip_keeps_history_and_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "devices" / "partition-3.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.record(_entry(1))
        ledger.record(_entry(2, sigma=1.5, q=0.25, steps=8))
        before = ledger.epsilon(DELTA)
    with PrivacyLedger(path) as reopened:
        assert reopened.history() == [(1.0, 0.5, 2), (1.5, 0.25, 8)]
        assert reopened.epsilon(DELTA) == before
        assert reopened.entry(1, 2) == _entry(2, sigma=1.5, q=0.25, steps=8)
        mode = reopened._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_recording_a_round_twice_does_not_double_count() -> None:
    ledger = PrivacyLedger(":memory:")
    assert ledger.record(_entry(1)) is True
    once = ledger.epsilon(DELTA)
    assert ledger.record(_entry(1)) is False
    assert ledger.epsilon(DELTA) == once and len(ledger.entries()) == 1
    # The same round of another run is a different round.
    assert ledger.record(_entry(1, run_id=2)) is True
    with pytest.raises(ValueError, match="already charged"):
        ledger.record(_entry(1, steps=3))


def test_would_exceed() -> None:
    ledger = PrivacyLedger(":memory:")
    ledger.record(_entry(1))  # 5.377
    assert not ledger.would_exceed(_entry(2), budget=8.0, delta=DELTA)  # 7.41
    assert ledger.would_exceed(_entry(2), budget=7.0, delta=DELTA)
    # A round already charged is not charged again by the check either.
    assert not ledger.would_exceed(_entry(1), budget=5.4, delta=DELTA)


def test_no_noise_means_infinite_epsilon() -> None:
    assert rdp_epsilon([(0.0, 1.0, 1)], DELTA) == float("inf")
    assert rdp_epsilon([], DELTA) == 0.0


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.record(_entry(1))
        with pytest.raises(RuntimeError):
            with ledger._transaction() as cur:  # a crash between two statements of one write
                cur.execute("INSERT INTO ledger_steps VALUES ('', 1, 2, 1.0, 0.5, 2, 0.0)")
                raise RuntimeError("power cut")
    with PrivacyLedger(path) as reopened:
        assert reopened.history() == [(1.0, 0.5, 2)]


def test_schema_version_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE ledger_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ValueError, match="schema version 99"):
        PrivacyLedger(path)


def test_in_memory_ledger_lives_in_context_state() -> None:
    state = RecordDict()
    with open_device_ledger(None, state) as ledger:
        ledger.record(_entry(1))
    assert STATE_KEY in state.config_records
    with open_device_ledger(None, state) as ledger:
        ledger.record(_entry(2))
        assert ledger.history() == [(1.0, 0.5, 2), (1.0, 0.5, 2)]


def test_file_ledger_ignores_context_state(tmp_path: Path) -> None:
    state = RecordDict()
    with open_device_ledger(tmp_path / "d" / "p.sqlite", state) as ledger:
        ledger.record(_entry(1))
    assert STATE_KEY not in state.config_records
    with open_device_ledger(tmp_path / "d" / "p.sqlite", RecordDict()) as ledger:
        assert len(ledger.entries()) == 1


def test_flower_run_ids_beyond_sqlite_integer_are_kept(tmp_path) -> None:
    """Flower run ids are unsigned 64-bit; SQLite INTEGER is signed 64-bit."""
    from fedinterest.client.ledger import LedgerEntry, PrivacyLedger

    run_id = 2**64 - 1
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        assert ledger.record(LedgerEntry(run_id, 1, 1.0, 0.5, 2))
        assert not ledger.record(LedgerEntry(run_id, 1, 1.0, 0.5, 2))
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        assert ledger.entries() == [LedgerEntry(run_id, 1, 1.0, 0.5, 2)]
        assert ledger.entry(run_id, 1) is not None


def test_charge_checks_the_budget_and_records_in_one_step() -> None:
    ledger = PrivacyLedger(":memory:")
    assert ledger.charge({DEVICE_USER: _entry(1)}, budget=8.0, delta=DELTA) == {DEVICE_USER: Charge.CHARGED}  # 5.377
    assert ledger.charge({DEVICE_USER: _entry(1)}, budget=8.0, delta=DELTA) == {DEVICE_USER: Charge.ALREADY_CHARGED}
    assert ledger.charge({DEVICE_USER: _entry(2)}, budget=7.0, delta=DELTA) == {DEVICE_USER: Charge.OVER_BUDGET}  # 7.41 > 7
    assert [e.server_round for e in ledger.entries()] == [1]
    # Without a budget (DP off) the round is charged all the same: a retry is still refused.
    assert ledger.charge({DEVICE_USER: _entry(2, sigma=0.0)}, budget=None, delta=DELTA) == {DEVICE_USER: Charge.CHARGED}
    assert ledger.epsilon(DELTA) == float("inf")


def test_users_of_one_file_have_separate_accounts(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with PrivacyLedger(path) as node:
        outcomes = node.charge({"7": _entry(1), "8": _entry(1), "9": _entry(1, steps=40)}, budget=8.0, delta=DELTA)
        assert outcomes == {"7": Charge.CHARGED, "8": Charge.CHARGED, "9": Charge.OVER_BUDGET}
        assert node.charge({"7": _entry(2), "8": _entry(1)}, budget=8.0, delta=DELTA) == {"7": Charge.CHARGED, "8": Charge.ALREADY_CHARGED}
        assert node.users() == ["7", "8"]
        assert node.entries() == []  # the file's own (device) account is untouched
    with PrivacyLedger(path, user="7") as seven, PrivacyLedger(path, user="8") as eight:
        assert seven.history() == [(1.0, 0.5, 2), (1.0, 0.5, 2)] and eight.history() == [(1.0, 0.5, 2)]
        assert seven.epsilon(DELTA) == pytest.approx(7.4097336, rel=1e-6)


def test_a_version_1_ledger_becomes_the_devices_own_account(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the layout version 1 wrote
        conn.execute("CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO ledger_meta VALUES ('schema_version', '1')")
        conn.execute(
            "CREATE TABLE ledger_steps (run_id TEXT NOT NULL, server_round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,"
            " sample_rate REAL NOT NULL, steps INTEGER NOT NULL, recorded_at REAL NOT NULL, PRIMARY KEY (run_id, server_round))"
        )
        conn.execute("INSERT INTO ledger_steps VALUES ('18446744073709551615', 1, 1.0, 0.5, 4, 1.0)")
    with PrivacyLedger(path) as ledger:
        assert ledger.entries() == [LedgerEntry(2**64 - 1, 1, 1.0, 0.5, 4)]
        assert ledger.epsilon(DELTA) == pytest.approx(7.4097336, rel=1e-6)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'").fetchone() == ("2",)
