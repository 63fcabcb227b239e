"""The device's local store: one SQLite file with the user's history, the catalogue, the models and the ledger.

Tables (all in `store.sqlite` of the device directory; docs/device.md shows them):
  - `store_meta`       key/value: schema version, the device's user id, privacy settings last seen;
  - `store_catalogue`  model index -> raw item id (the operator's `catalogue.txt`);
  - `store_events`     the user's interactions by raw item id, in import order; items not
                       in the catalogue are kept (a later catalogue may know them) but not used;
  - `store_imports`    one row per imported file (its SHA-256), which makes ingest idempotent;
  - `store_models`     the latest bundle and the latest global model the device received;
  - `ledger_*`         the privacy ledger (client/ledger.py), in the same file.

Durability as the ledger's: WAL journal, `synchronous=FULL`, one transaction per
write, so a process killed at any point leaves the last committed state.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedinterest.client.sqlite_transaction import write_transaction
from fedinterest.common.catalogue import Catalogue
from fedinterest.common.errors import FedinterestError

SCHEMA_VERSION = 1
# store_meta keys: the privacy settings of the last run the device trained in (written with
# each global model it receives, client/local_models.py; read by `device budget`).
META_DELTA = "privacy_delta"
META_BUDGET = "privacy_epsilon_budget"
MODEL_KINDS = ("bundle", "global")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS store_catalogue (idx INTEGER PRIMARY KEY CHECK (idx >= 1), item_id TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS store_imports ("
    " import_id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE, source TEXT NOT NULL,"
    " format TEXT NOT NULL, user_id TEXT NOT NULL, rows_read INTEGER NOT NULL, rows_added INTEGER NOT NULL,"
    " imported_at REAL NOT NULL)",
    # UNIQUE(item, time): the same interaction from another file (or an overlapping export) is not added twice.
    "CREATE TABLE IF NOT EXISTS store_events ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, timestamp REAL NOT NULL, rating REAL,"
    " import_id INTEGER NOT NULL REFERENCES store_imports(import_id), source_line INTEGER,"
    " UNIQUE (item_id, timestamp))",
    "CREATE TABLE IF NOT EXISTS store_models ("
    " model_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL CHECK (kind IN ('bundle', 'global')),"
    " received_at REAL NOT NULL, sha256 TEXT NOT NULL, payload BLOB NOT NULL, meta TEXT NOT NULL)",
)


class StoreError(FedinterestError, ValueError):
    """The device store is missing, of another version, or asked for something it cannot do."""


@dataclass(frozen=True)
class ImportResult:
    """What one ingest did; `already_imported` when the same file was imported before."""

    source: str
    sha256: str
    user_id: str
    rows_read: int
    rows_added: int
    duplicates: int  # rows already in the store (same item and time)
    unknown_items: int  # rows of this file whose item is not in the catalogue (kept, not used)
    already_imported: bool


@dataclass(frozen=True)
class StoredModel:
    """A model the device holds: a bundle file's bytes, or a global model's safetensors and config."""

    model_id: int
    kind: str
    received_at: float
    sha256: str
    payload: bytes
    meta: dict


@dataclass(frozen=True)
class History:
    """The user's history as model indices of a catalogue, oldest first; `unknown` rows were not mapped."""

    indices: np.ndarray
    unknown: int
    total: int


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DeviceStore:
    """The device store at `path` (see the module docstring); use as a context manager."""

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        """Open the store; with `create`, make a new one (StoreError if the file exists)."""
        self.path = Path(path)
        if create and self.path.exists() and self.path.stat().st_size > 0:
            raise StoreError(f"{self.path}: a device store already exists here; refusing to overwrite it")
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no device store here (run `fedinterest device init DIR --catalogue FILE` first)")
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._ensure_schema(create)
        except BaseException:
            self._conn.close()
            raise

    def _ensure_schema(self, create: bool) -> None:
        with self.transaction() as cur:
            if create:
                for statement in _SCHEMA:
                    cur.execute(statement)
                cur.execute("INSERT INTO store_meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                cur.execute("INSERT INTO store_meta (key, value) VALUES ('created_at', ?)", (repr(time.time()),))
                return
            row = cur.execute(
                "SELECT value FROM store_meta WHERE key = 'schema_version'"
            ).fetchone() if self._has_table(cur, "store_meta") else None
            if row is None:
                raise StoreError(f"{self.path}: not a fedinterest device store (no store_meta table)")
            if row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: store schema version {row[0]}, this software reads version {SCHEMA_VERSION}")

    @staticmethod
    def _has_table(cur: sqlite3.Cursor, name: str) -> bool:
        return cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def transaction(self) -> AbstractContextManager[sqlite3.Cursor]:
        """One write transaction: committed whole, or rolled back whole on any exception."""
        return write_transaction(self._conn)

    # ------------------------------------------------------------------ meta

    def meta(self, key: str) -> str | None:
        """A value of `store_meta`, None when absent."""
        row = self._conn.execute("SELECT value FROM store_meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a `store_meta` value."""
        with self.transaction() as cur:
            cur.execute("INSERT INTO store_meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def user_id(self) -> str | None:
        """The user this device's history belongs to (set by the first ingest)."""
        return self.meta("user_id")

    # ------------------------------------------------------------------ catalogue

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Store the catalogue once (at init); StoreError if the store already has one."""
        with self.transaction() as cur:
            if cur.execute("SELECT 1 FROM store_catalogue LIMIT 1").fetchone():
                raise StoreError(f"{self.path}: the store already has a catalogue")
            cur.executemany("INSERT INTO store_catalogue (idx, item_id) VALUES (?, ?)", enumerate(catalogue.ids, start=1))

    def catalogue(self) -> Catalogue:
        """The catalogue the device's models index."""
        ids = [row[0] for row in self._conn.execute("SELECT item_id FROM store_catalogue ORDER BY idx")]
        if not ids:
            raise StoreError(f"{self.path}: the store has no catalogue (re-initialise the device with --catalogue FILE)")
        return Catalogue(ids, source=f"{self.path}:store_catalogue")

    # ------------------------------------------------------------------ history

    def import_interactions(
        self, *, items: list[str], timestamps: np.ndarray, ratings: np.ndarray | None, lines: np.ndarray | None,
        user_id: str, source: str, fmt: str, sha256: str,
    ) -> ImportResult:
        """Add one file's interactions of `user_id` in one transaction (nothing is added on any error)."""
        catalogue = self.catalogue()
        unknown = sum(1 for item in items if item not in catalogue)
        with self.transaction() as cur:
            stored_user = cur.execute("SELECT value FROM store_meta WHERE key = 'user_id'").fetchone()
            if stored_user is not None and stored_user[0] != user_id:
                raise StoreError(f"{self.path}: this device holds the history of user {stored_user[0]!r}, not of user {user_id!r} ({source})")
            earlier = cur.execute("SELECT imported_at FROM store_imports WHERE sha256 = ?", (sha256,)).fetchone()
            if earlier is not None:
                return ImportResult(source, sha256, user_id, len(items), 0, len(items), unknown, already_imported=True)
            if stored_user is None:
                cur.execute("INSERT INTO store_meta (key, value) VALUES ('user_id', ?)", (user_id,))
            cur.execute(
                "INSERT INTO store_imports (sha256, source, format, user_id, rows_read, rows_added, imported_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
                (sha256, source, fmt, user_id, len(items), time.time()),
            )
            import_id = cur.lastrowid
            before = cur.execute("SELECT COUNT(*) FROM store_events").fetchone()[0]
            rows = (
                (item, float(timestamps[i]), None if ratings is None else float(ratings[i]), import_id, None if lines is None else int(lines[i]))
                for i, item in enumerate(items)
            )
            cur.executemany(
                "INSERT OR IGNORE INTO store_events (item_id, timestamp, rating, import_id, source_line) VALUES (?, ?, ?, ?, ?)", rows
            )
            added = cur.execute("SELECT COUNT(*) FROM store_events").fetchone()[0] - before
            cur.execute("UPDATE store_imports SET rows_added = ? WHERE import_id = ?", (added, import_id))
        return ImportResult(source, sha256, user_id, len(items), added, len(items) - added, unknown, already_imported=False)

    def raw_history(self) -> list[str]:
        """The user's raw item ids by time, ties in import order (file order within a file)."""
        return [row[0] for row in self._conn.execute("SELECT item_id FROM store_events ORDER BY timestamp, seq")]

    def history(self, catalogue: Catalogue | None = None) -> History:
        """The history as indices of `catalogue` (default: the store's); items it lacks are counted, not used."""
        catalogue = catalogue or self.catalogue()
        raw = self.raw_history()
        mapped = [catalogue.index(item) for item in raw]
        indices = np.asarray([i for i in mapped if i is not None], dtype=np.int64)
        return History(indices=indices, unknown=len(raw) - len(indices), total=len(raw))

    def counts(self) -> dict[str, int]:
        """Sizes of the store's tables, for status output."""
        tables = ("store_catalogue", "store_events", "store_imports", "store_models")
        return {table: self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables}

    # ------------------------------------------------------------------ models

    def save_model(self, kind: str, payload: bytes, meta: dict) -> int:
        """Keep `payload` as the latest model of `kind` (older ones of that kind are dropped); its model_id."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        digest = hashlib.sha256(payload).hexdigest()
        with self.transaction() as cur:
            cur.execute("DELETE FROM store_models WHERE kind = ?", (kind,))
            cur.execute(
                "INSERT INTO store_models (kind, received_at, sha256, payload, meta) VALUES (?, ?, ?, ?, ?)",
                (kind, time.time(), digest, payload, json.dumps(meta, sort_keys=True)),
            )
            assert cur.lastrowid is not None  # the row just inserted
            return int(cur.lastrowid)

    def latest_model_id(self) -> int | None:
        """The id of the newest model of any kind (cheap: for caches), None without a model."""
        row = self._conn.execute("SELECT MAX(model_id) FROM store_models").fetchone()
        return row[0]

    def latest_model(self) -> StoredModel | None:
        """The most recently received model, bundle or global; None when the device has none."""
        row = self._newest_model("model_id, kind, received_at, sha256, payload, meta")
        if row is None:
            return None
        model_id, kind, received_at, digest, payload, meta = row
        if hashlib.sha256(payload).hexdigest() != digest:
            raise StoreError(f"{self.path}: stored {kind} model {model_id} does not match its SHA-256 {digest}")
        return StoredModel(model_id, kind, received_at, digest, bytes(payload), json.loads(meta))

    def export_rows(self) -> tuple[list[dict], list[dict]]:
        """The history as stored (by time) and the imports, as plain rows (for `device export`)."""
        events = [
            {"item_id": item, "timestamp": ts, "rating": rating, "import_id": imp, "source_line": line}
            for item, ts, rating, imp, line in self._conn.execute(
                "SELECT item_id, timestamp, rating, import_id, source_line FROM store_events ORDER BY timestamp, seq")
        ]
        columns = ("import_id", "sha256", "source", "format", "user_id", "rows_read", "rows_added", "imported_at")
        imports = [dict(zip(columns, row)) for row in self._conn.execute(f"SELECT {', '.join(columns)} FROM store_imports ORDER BY import_id")]
        return events, imports

    def latest_model_info(self) -> dict | None:
        """The newest model's kind, time, SHA-256 and metadata, without its bytes (for status output)."""
        row = self._newest_model("model_id, kind, received_at, sha256, length(payload), meta")
        if row is None:
            return None
        info = dict(zip(("model_id", "kind", "received_at", "sha256", "bytes"), row[:5]))
        return info | {"meta": json.loads(row[5])}

    def _newest_model(self, columns: str) -> tuple | None:
        return self._conn.execute(f"SELECT {columns} FROM store_models ORDER BY model_id DESC LIMIT 1").fetchone()

    def forget(self, *, reset_ledger: bool = False) -> dict[str, int]:
        """Delete the user's history, its imports and the models, in one transaction; rows removed per table.

        The privacy policy stays. The ledger stays unless `reset_ledger`: the epsilon already
        spent was spent on releases that are out there, whatever happens to the history here.
        """
        removed = {}
        with self.transaction() as cur:
            for table in ("store_events", "store_imports", "store_models"):
                removed[table] = cur.execute(f"DELETE FROM {table}").rowcount
            cur.execute("DELETE FROM store_meta WHERE key IN ('user_id', ?, ?)", (META_DELTA, META_BUDGET))
            if reset_ledger:
                # client/ledger.py's table of charged rounds (same file, same transaction).
                removed["ledger_steps"] = cur.execute("DELETE FROM ledger_steps").rowcount if self._has_table(cur, "ledger_steps") else 0
        self._conn.execute("VACUUM")  # the deleted rows' bytes leave the file too
        return removed

    # ------------------------------------------------------------------ lifecycle

    def integrity_check(self) -> str:
        """SQLite's own `PRAGMA integrity_check` ("ok" when the file is sound)."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        """Close the connection (everything written is already committed)."""
        self._conn.close()

    def __enter__(self) -> DeviceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
