"""The device's privacy ledger: every DP-SGD round it took part in, in SQLite.

The ledger is the device's accountant state, kept across every round and run it takes
part in (docs/privacy.md, layer 1). One row per (run, server round) holds that round's
accountant entry: noise multiplier, Poisson sample rate and number of optimizer steps,
the `(noise_multiplier, sample_rate, steps)` triple Opacus's RDP accountant keeps in its
`history`. Epsilon is always recomputed by `opacus.accountants.RDPAccountant` from the
stored rows, never stored itself.

Durability: WAL journal with `synchronous=FULL` and one transaction per write, so a
crash mid-round leaves either the whole round's row or none of it (a lost charge would
under-count the privacy spent). The caller charges a round before it trains (below),
so a crash can only over-charge, never under-charge.

Charged before training: `charge` checks the budget and writes the round's entry in
one write transaction, before the device trains, so two overlapping rounds on one
ledger (Flower's executor does not wait for a ClientApp process to end before it starts
the next) can never both pass the check and together exceed the budget. A round whose
training then fails stays charged: that over-charges, never under-charges.

Users: a ledger file holds the accounts of one or more users. A device keeps its own
user's under the empty key; a simulated node that stands for a shard of users
(docs/simulations.md, "Shards") keeps one account per user, keyed by the user's index
in the dataset, and charges all the users of a round in one transaction.

Idempotence: a round is charged at most once. Recording the same (run, round) entry
again is a no-op; recording a different entry for a round already charged is an error.
A retried round is never trained twice (`client.local_training` refuses it), because a
second training would be a second noisy release the ledger would have to charge.

Where it lives: a file path (in simulation `{run_dir}/devices/partition-{id}.sqlite`,
on a real device the device store file), or, when a simulation has no run directory,
an in-memory database whose image is kept in the node's `Context.state` between rounds
(`open_device_ledger`). That image lives only as long as the simulation's node state:
it is not durable and does not survive a restart of the process holding it. A
simulation's ClientApp process keeps a node's file ledger open between that node's
messages (client/warm_node.py); every write is still its own committed transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import astuple, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from fedinterest.client.sqlite_transaction import write_transaction

if TYPE_CHECKING:  # Flower and Opacus (with torch) only where used: `device budget` of a fresh device needs neither
    from flwr.app import RecordDict

SCHEMA_VERSION = 2  # 2: accounts per user (a `user` column); version 1 files are migrated on open

# Tables are prefixed: on a real device they share the device store's SQLite file.
_META = "ledger_meta"
_STEPS = "ledger_steps"

# Key of the ConfigRecord in Context.state that holds an in-memory ledger's image.
STATE_KEY = "privacy-ledger"
_IMAGE = "sqlite-image"


# A device's own account (the one user of a real device).
DEVICE_USER = ""


class Charge(str, Enum):
    """What `PrivacyLedger.charge` did with one round's entry."""

    CHARGED = "charged"  # recorded: the round may train
    OVER_BUDGET = "over-budget"  # not recorded: it would take the user past the budget
    ALREADY_CHARGED = "already-charged"  # not recorded again: a retried round is never trained twice


@dataclass(frozen=True)
class LedgerEntry:
    """One round's charge: `steps` DP-SGD steps at `noise_multiplier` and Poisson rate `sample_rate`."""

    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    @property
    def accountant_step(self) -> tuple[float, float, int]:
        """The `(noise_multiplier, sample_rate, steps)` triple of Opacus's accountant history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of an RDP accountant history; inf once any step had no noise."""
    if any(sigma == 0 for sigma, _, _ in history):
        return float("inf")  # no noise means no guarantee; Opacus would warn and return inf
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


class PrivacyLedger:
    """The accountant history of one device, persisted in SQLite (see the module docstring)."""

    _view: bool  # True on the views for_user makes (which close nothing); unset on the owner

    def __init__(self, db_path: str | Path, user: str = DEVICE_USER) -> None:
        """Open (creating if needed) the ledger in the SQLite file `db_path`, or ":memory:";
        the single-user methods read and write the account of `user`."""
        self.path = str(db_path)
        self.user = user
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        self._conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._ensure_schema()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def from_image(cls, image: bytes | None) -> PrivacyLedger:
        """An in-memory ledger, loaded from a `snapshot()` image when one is given."""
        ledger = cls(":memory:")
        if image:
            ledger._conn.deserialize(image)
            ledger._ensure_schema()
        return ledger

    def snapshot(self) -> bytes:
        """The whole database as bytes (for an in-memory ledger kept in Context.state)."""
        return self._conn.serialize()

    def _ensure_schema(self) -> None:
        with self._transaction() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS {_META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = cur.execute(f"SELECT value FROM {_META} WHERE key = 'schema_version'").fetchone()
            if row is None:
                _create_steps(cur, _STEPS)
                cur.execute(f"INSERT INTO {_META} (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] == "1":
                _migrate_from_v1(cur)
            elif row[0] != str(SCHEMA_VERSION):
                raise ValueError(
                    f"privacy ledger {self.path}: schema version {row[0]}, this software reads version {SCHEMA_VERSION}"
                )

    def _transaction(self) -> AbstractContextManager[sqlite3.Cursor]:
        """One write transaction: committed whole, or rolled back whole on any exception."""
        return write_transaction(self._conn)

    def entries(self) -> list[LedgerEntry]:
        """Every charged round, oldest first."""
        return _entries(self._conn, self.user)

    def entry(self, run_id: int, server_round: int) -> LedgerEntry | None:
        """The charge of one round, if it was recorded."""
        return _charged(self._conn, self.user, run_id, server_round)

    def history(self) -> list[tuple[float, float, int]]:
        """The stored rounds as Opacus's accountant `history` list."""
        return [e.accountant_step for e in self.entries()]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0.0 for a device that never trained)."""
        return rdp_epsilon(self.history(), delta)

    def epsilon_with(self, entry: LedgerEntry, delta: float) -> float:
        """Epsilon at `delta` if `entry` were charged too (a round already charged counts once)."""
        if self.entry(entry.run_id, entry.server_round) is not None:
            return self.epsilon(delta)
        return rdp_epsilon([*self.history(), entry.accountant_step], delta)

    def would_exceed(self, entry: LedgerEntry, budget: float, delta: float) -> bool:
        """Whether charging `entry` would take the device past `budget` epsilon at `delta`."""
        return self.epsilon_with(entry, delta) > budget

    def record(self, entry: LedgerEntry) -> bool:
        """Charge one round; False (and no change) when the same round was already charged.

        Raises ValueError when the round was already charged with a different entry.
        """
        with self._transaction() as cur:
            existing = _charged(cur, self.user, entry.run_id, entry.server_round)
            if existing is not None:
                if existing != entry:
                    raise ValueError(f"round {entry.server_round} of run {entry.run_id} is already charged as {astuple(existing)}, not {astuple(entry)}")
                return False
            _insert(cur, self.user, entry)
        return True

    def charge(self, entries: Mapping[str, LedgerEntry], *, budget: float | None, delta: float) -> dict[str, Charge]:
        """Check and record one round's entry for each user, in one write transaction.

        A user whose round is already charged is not charged again; with a `budget`
        (epsilon at `delta`; None: no budget, e.g. DP off), a user whom the entry would
        take past it is not charged. What is recorded is what may train.
        """
        outcomes = {}
        with self._transaction() as cur:
            for user, entry in entries.items():
                if _charged(cur, user, entry.run_id, entry.server_round) is not None:
                    outcomes[user] = Charge.ALREADY_CHARGED
                elif budget is not None and rdp_epsilon([*(e.accountant_step for e in _entries(cur, user)), entry.accountant_step], delta) > budget:
                    outcomes[user] = Charge.OVER_BUDGET
                else:
                    _insert(cur, user, entry)
                    outcomes[user] = Charge.CHARGED
        return outcomes

    def users(self) -> list[str]:
        """The users with at least one charged round."""
        return [row[0] for row in self._conn.execute(f"SELECT DISTINCT user FROM {_STEPS} ORDER BY user")]

    def for_user(self, user: str) -> PrivacyLedger:
        """The account of `user` in the same database, on the same connection (closing it closes nothing)."""
        view = object.__new__(PrivacyLedger)
        view.__dict__.update(self.__dict__)
        view.user, view._view = user, True
        return view

    def close(self) -> None:
        """Close the database (everything recorded is already committed); a `for_user` view closes nothing."""
        if not getattr(self, "_view", False):
            self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_device_ledger(path: Path | None, state: RecordDict) -> Iterator[PrivacyLedger]:
    """The device's ledger: the SQLite file at `path`, else an in-memory one kept in `state`.

    `state` is the node's `Context.state`; the in-memory image is written back to it on
    exit, also when the body raised after recording.
    """
    if path is not None:
        with PrivacyLedger(path) as ledger:
            yield ledger
        return
    record = state.config_records.get(STATE_KEY)
    image = record[_IMAGE] if record is not None else None
    ledger = PrivacyLedger.from_image(image if isinstance(image, bytes) else None)
    try:
        yield ledger
    finally:
        from flwr.app import ConfigRecord

        state[STATE_KEY] = ConfigRecord({_IMAGE: ledger.snapshot()})
        ledger.close()


def _create_steps(cur: sqlite3.Cursor, table: str) -> None:
    cur.execute(
        f"CREATE TABLE {table} ("
        " user TEXT NOT NULL DEFAULT '',"  # DEVICE_USER on a device; the user's index on a simulated node
        " run_id TEXT NOT NULL,"  # Flower run ids are unsigned 64-bit: beyond SQLite INTEGER
        " server_round INTEGER NOT NULL,"
        " noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),"
        " sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),"
        " steps INTEGER NOT NULL CHECK (steps >= 1),"
        " recorded_at REAL NOT NULL,"
        " PRIMARY KEY (user, run_id, server_round))"
    )


def _migrate_from_v1(cur: sqlite3.Cursor) -> None:
    """Version 1 held one device's rounds: they become the device's own account (inside the open transaction)."""
    _create_steps(cur, f"{_STEPS}_v2")
    cur.execute(
        f"INSERT INTO {_STEPS}_v2 (user, run_id, server_round, noise_multiplier, sample_rate, steps, recorded_at) "
        f"SELECT ?, run_id, server_round, noise_multiplier, sample_rate, steps, recorded_at FROM {_STEPS}",
        (DEVICE_USER,),
    )
    cur.execute(f"DROP TABLE {_STEPS}")
    cur.execute(f"ALTER TABLE {_STEPS}_v2 RENAME TO {_STEPS}")
    cur.execute(f"UPDATE {_META} SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


_COLUMNS = "run_id, server_round, noise_multiplier, sample_rate, steps"


def _entries(conn: sqlite3.Connection | sqlite3.Cursor, user: str) -> list[LedgerEntry]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM {_STEPS} WHERE user = ? ORDER BY recorded_at, run_id, server_round", (user,)).fetchall()
    return [_entry(row) for row in rows]


def _charged(conn: sqlite3.Connection | sqlite3.Cursor, user: str, run_id: int, server_round: int) -> LedgerEntry | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM {_STEPS} WHERE user = ? AND run_id = ? AND server_round = ?", (user, str(run_id), server_round)
    ).fetchone()
    return _entry(row) if row else None


def _insert(cur: sqlite3.Cursor, user: str, entry: LedgerEntry) -> None:
    cur.execute(
        f"INSERT INTO {_STEPS} (user, {_COLUMNS}, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (user, str(entry.run_id), entry.server_round, entry.noise_multiplier, entry.sample_rate, entry.steps, time.time()),
    )


def _entry(row: tuple) -> LedgerEntry:
    """A stored row as an entry (run ids are kept as text, see the schema)."""
    run_id, server_round, noise_multiplier, sample_rate, steps = row
    return LedgerEntry(int(run_id), server_round, noise_multiplier, sample_rate, steps)
