"""`flower-superlink` with a longer SQLite busy timeout: `python -m fedinterest.server.superlink_main FLAGS`.

Flower 1.41 opens its SQLite state with `PRAGMA busy_timeout = 5000`
(flwr.supercore.constant.SQLITE_PRAGMAS): a write that waits more than 5 s for the lock
fails with "database is locked", and the Fleet API answers the SuperNode's
push-messages / push-object with HTTP 500, which the SuperNode does not retry: the
device's reply is lost and the round waits for its timeout. With 20 SuperNodes on this
2-core machine under load that happened in the first round (benchmarks/deployment_load.py,
docs/benchmarks.md). Waiting longer for the lock costs nothing when there is no
contention, so the SuperLink of a deployment waits up to BUSY_TIMEOUT_MS. Everything else
is Flower's own `flower-superlink`, flags unchanged.
"""

from __future__ import annotations

BUSY_TIMEOUT_MS = 120_000


def main() -> None:
    """Raise Flower's SQLite busy timeout, then run Flower's `flower-superlink` entry point."""
    import flwr.supercore.constant as constant

    constant.SQLITE_PRAGMAS = tuple(  # type: ignore[assignment]  # the same pairs; Flower types it as its literal 7-tuple
        ("busy_timeout", str(BUSY_TIMEOUT_MS)) if name == "busy_timeout" else (name, value) for name, value in constant.SQLITE_PRAGMAS
    )
    import flwr.supercore.sql_mixin as sql_mixin  # it copied the tuple at import: set it there too

    sql_mixin.SQLITE_PRAGMAS = constant.SQLITE_PRAGMAS
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
