"""A device owner's view of the device: `device status`, `device export`, `device forget`.

`status` reads only the device directory: the store (history, catalogue, latest model),
the ledger (through `device budget`'s report), the privacy policy, and the session record
of `device start` (client/device_session.py: whether it runs, where it was last accepted
by a SuperLink and as which node). Whether the operator still has the device enrolled is
the operator's to say (`fedinterest server devices`); the device knows when a SuperLink
last accepted its key.

`export` writes everything the device holds about its user, as JSON: the history as
imported, the imports, the ledger's charged rounds and the policy (the models' bytes stay;
their descriptions are included). `forget` deletes the history, the imports and the
models (client/device_store.py `forget`); it refuses while `device start` runs, since the
ClientApp would keep reading the store.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedinterest.client.budget import privacy_budget
from fedinterest.client.device_dir import DeviceDir, public_key_fingerprint
from fedinterest.client.device_session import last_session, running_session
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.privacy_policy import load_policy
from fedinterest.common.errors import FedinterestError
from fedinterest.common.serialization import atomic_write_text

EXPORT_FORMAT = 1


class DeviceBusyError(FedinterestError, ValueError):
    """The device's SuperNode is running; the store may not be changed under it."""


def _finite(value: float) -> float | None:
    return None if value != value or value in (float("inf"), float("-inf")) else value


def _stamp(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def device_status(device: DeviceDir) -> dict[str, Any]:
    """History size, model, budget, policy, key and connection of the device in `device`."""
    key_line = " ".join(device.public_key.read_text(encoding="ascii").split()[:2])
    with device.store() as store:
        catalogue = store.catalogue()
        history = store.history(catalogue)
        counts = store.counts()
        model = store.latest_model_info()
        budget = privacy_budget(store)
        policy = load_policy(store)
        user = store.user_id()
    running = running_session(device.root)
    session = running or last_session(device.root)
    if running:
        connection = "running" + (f": accepted by the SuperLink at {session.get('server')} as node {session['node_id']}" if session.get("activated_at", 0) >= session.get("started_at", 0) and session.get("node_id") else ": not accepted by a SuperLink yet")
    elif session.get("started_at"):
        connection = "stopped" + ("" if session.get("stopped_at") else " without signing off (killed?)")
    else:
        connection = "never started (`fedinterest device start`)"
    return {
        "dir": str(device.root),
        "user_id": user,
        "history": {"interactions": history.total, "in_catalogue": len(history.indices), "outside_catalogue": history.unknown,
                    "imports": counts["store_imports"], "trainable": len(history.indices) >= 3},
        "catalogue_items": len(catalogue),
        "model": None if model is None else {
            "kind": model["kind"], "sha256": model["sha256"], "received_at": _stamp(model["received_at"]), "bytes": model["bytes"],
            "run_id": model["meta"].get("run_id"), "server_round": model["meta"].get("server_round"),
        },
        "ranking": "the latest model" if model else "fallback: catalogue order (no model yet)",
        "budget": {**asdict(budget), "epsilon": _finite(budget.epsilon), "remaining": _finite(budget.remaining)},
        "policy": asdict(policy),
        "key": {"public_key": str(device.public_key), "fingerprint": public_key_fingerprint(key_line)},
        "connection": {
            "state": connection, "server": session.get("server"), "node_id": session.get("node_id"),
            "last_accepted_at": _stamp(session.get("activated_at")), "pid": session.get("pid") if running else None,
            "last_stopped_at": _stamp(session.get("stopped_at")),
        },
    }


def export_device(device: DeviceDir, out: Path) -> dict[str, Any]:
    """Write everything the device holds about its user to `out` (JSON); what was written."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; export never overwrites a file")
    with device.store() as store:
        events, imports = store.export_rows()
        model = store.latest_model_info()
        policy = load_policy(store)
        user = store.user_id()
    with PrivacyLedger(device.store_path) as ledger:
        charged = [asdict(entry) | {"run_id": str(entry.run_id)} for entry in ledger.entries()]
    document = {
        "format": EXPORT_FORMAT, "exported_at": _stamp(time.time()), "device": str(device.root), "user_id": user,
        "history": events, "imports": imports, "ledger": charged, "privacy_policy": asdict(policy),
        "latest_model": None if model is None else {k: model[k] for k in ("kind", "sha256", "bytes", "meta")} | {"received_at": _stamp(model["received_at"])},
    }
    atomic_write_text(out, json.dumps(document, indent=2) + "\n")
    out.chmod(0o600)  # the user's history: readable by the owner only, as the store is
    return {"out": str(out), "interactions": len(events), "imports": len(imports), "ledger_rounds": len(charged)}


def forget_device(device: DeviceDir, *, reset_ledger: bool = False) -> dict[str, int]:
    """Delete the history, imports and models (and the ledger when asked); refused while the device runs."""
    running = running_session(device.root)
    if running:
        raise DeviceBusyError(f"{device.root}: `device start` is running (pid {running.get('pid')}); stop it before forgetting the history")
    with device.store() as store:
        return store.forget(reset_ledger=reset_ledger)
