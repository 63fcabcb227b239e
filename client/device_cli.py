"""`fedinterest device ...`: the commands a user's device runs (never imports the server side).

Each command parses its options and delegates to one library function of `client/`;
errors are printed as one `error:` line naming what and where, with the exit code of every
fedinterest command (common/errors.py): 2 for anything the user can fix. `device start`
passes on the SuperNode's exit code, or 3 / 4 (the SuperLink unreachable / the device not enrolled).
"""

from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

# Only what every command needs is imported here; ranking, bundles and ingest (torch,
# onnxruntime, pyarrow) are imported by their commands, so that `--help`, `policy`,
# `budget` and `status` answer in a fraction of a second (issue 16).
from fedinterest.client.budget import privacy_budget
from fedinterest.client.device_dir import init_device_dir, open_device_dir
from fedinterest.client.personalization_settings import DEFAULT_STEPS, PersonalizationSettings
from fedinterest.client.privacy_policy import PrivacyPolicy, load_policy, save_policy
from fedinterest.common.cli_errors import ReportingGroup
from fedinterest.common.column_values import ColumnMap
from fedinterest.common.errors import UsageError
from fedinterest.common.interaction_loader import ALL_FORMATS
from fedinterest.common.table_loader import GENERIC_FORMATS


class _DeviceGroup(ReportingGroup):
    """The device commands: a FedinterestError exits 2 by the common rule; so do a ValueError
    (e.g. a policy value out of range) and an OSError (an unreadable or unwritable file)."""

    user_errors = (ValueError, OSError)


app = typer.Typer(
    cls=_DeviceGroup,
    help="Run fedinterest on a device: local store, federation client, local ranking.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DirOpt = Annotated[
    Path, typer.Option("--dir", envvar="FEDINTEREST_DEVICE_DIR", help="The device directory (made by `device init`).", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
MaxEpsilonOpt = Annotated[float, typer.Option("--max-epsilon", help="The most (example-level) epsilon this device will ever spend.")]
PersonalizeOpt = Annotated[int, typer.Option(
    "--personalize-steps",
    help="Adam steps adapting a copy of the received global model to this user's history before ranking (0: off); "
    "nothing of it leaves the device. An installed bundle ranks unadapted.",
)]
MaxDeltaOpt = Annotated[float, typer.Option("--max-delta", help="The largest delta this device accepts a run to state epsilon at.")]


def _emit(payload: dict, as_json: bool, lines: list[str]) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str) if as_json else "\n".join(lines))


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Device directory to create (must not exist or be empty).", show_default=False)],
    catalogue: Annotated[Path, typer.Option("--catalogue", help="The operator's catalogue.txt (one item id per line).", show_default=False)],
    max_epsilon: MaxEpsilonOpt = PrivacyPolicy.max_epsilon,
    max_delta: MaxDeltaOpt = PrivacyPolicy.max_delta,
    as_json: JsonOpt = False,
) -> None:
    """Create a device directory: an EC key pair (OpenSSH), the local store with the catalogue, the privacy policy."""
    policy = PrivacyPolicy(max_epsilon=max_epsilon, max_delta=max_delta)  # checked before anything is written
    device = init_device_dir(directory, catalogue)
    with device.store() as store:
        save_policy(store, policy)
        items = len(store.catalogue())
    _emit(
        {"dir": str(device.root), "public_key": str(device.public_key), "store": str(device.store_path), "catalogue_items": items,
         "privacy_policy": asdict(policy)},
        as_json,
        [f"device initialised in {device.root} ({items} catalogue items)",
         f"privacy policy: at most epsilon {policy.max_epsilon:g} at delta {policy.max_delta:g}, DP required",
         f"public key (send it to the operator to enroll this device): {device.public_key}"],
    )


@app.command()
def policy(
    directory: DirOpt,
    max_epsilon: Annotated[float | None, typer.Option("--max-epsilon", help="New maximum epsilon this device spends.")] = None,
    max_delta: Annotated[float | None, typer.Option("--max-delta", help="New maximum delta this device accepts.")] = None,
    share_metrics: Annotated[bool | None, typer.Option(
        "--share-metrics/--no-share-metrics",
        help="Whether to send the training loss and held-out HR@10/NDCG@10 when a run asks (share-metrics): noiseless, outside every guarantee.",
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or change the device's privacy floor: runs that turn DP off or ask for a larger delta are refused,
    no run spends more than the maximum epsilon, and noiseless metrics are sent only if allowed here,
    whatever the operator's run config says."""
    with open_device_dir(directory).store() as store:
        current = load_policy(store)
        if max_epsilon is not None or max_delta is not None or share_metrics is not None:
            current = PrivacyPolicy(
                max_epsilon=current.max_epsilon if max_epsilon is None else max_epsilon,
                max_delta=current.max_delta if max_delta is None else max_delta,
                share_metrics=current.share_metrics if share_metrics is None else share_metrics,
            )
            save_policy(store, current)
    _emit(asdict(current), as_json, [
        f"at most epsilon {current.max_epsilon:g} at delta {current.max_delta:g} (example-level, layer 1); DP required",
        f"noiseless metrics (training loss, held-out rank): {'sent when a run asks' if current.share_metrics else 'never sent'}",
    ])


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="Interactions file of this device's user.", show_default=False)],
    directory: DirOpt,
    fmt: Annotated[str | None, typer.Option("--format", help=f"One of: {', '.join(ALL_FORMATS)} (default: from the file suffix).")] = None,
    user: Annotated[str | None, typer.Option("--user", help="The user to import from a file that holds several.")] = None,
    user_col: Annotated[str, typer.Option(help="User column of a csv/tsv/jsonl/parquet file.")] = "user",
    item_col: Annotated[str, typer.Option(help="Item column of a csv/tsv/jsonl/parquet file.")] = "item",
    time_col: Annotated[str, typer.Option(help="Timestamp column (epoch seconds or ISO 8601).")] = "timestamp",
    rating_col: Annotated[str | None, typer.Option(help="Optional rating column.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import the user's interactions (validated; all or nothing; importing the same file again adds nothing)."""
    from fedinterest.client.ingest import ingest_file

    if fmt is not None and fmt not in ALL_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(ALL_FORMATS)}, got {fmt!r}")
    columns = ColumnMap(user=user_col, item=item_col, timestamp=time_col, rating=rating_col)
    # The fixed layouts have no named columns: only a generic format takes the mapping.
    generic = fmt is None or fmt in GENERIC_FORMATS
    with open_device_dir(directory).store() as store:
        result = ingest_file(store, file, fmt=fmt, columns=columns if generic else ColumnMap(), user=user)
    if result.already_imported:
        summary = f"{file}: already imported (SHA-256 {result.sha256[:12]}...); nothing added"
    else:
        summary = f"{file}: {result.rows_added} interactions of user {result.user_id!r} added ({result.duplicates} already there)"
    lines = [summary]
    if result.unknown_items:
        lines.append(f"{result.unknown_items} of its interactions name items outside the catalogue: kept, not used for training or ranking")
    _emit(asdict(result), as_json, lines)


@app.command()
def start(
    directory: DirOpt,
    server: Annotated[str, typer.Option("--server", help="The operator's SuperLink Fleet API, HOST:PORT.", show_default=False)],
    ca: Annotated[Path, typer.Option("--ca", help="The operator's CA certificate (ca.crt) to verify the server.", show_default=False)],
    runtime_port: Annotated[int | None, typer.Option(help="Loopback port of the SuperNode's runtime API (default: a free one).")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Give up after this many reconnection attempts (default: never).")] = None,
    max_wait_time: Annotated[float | None, typer.Option(help="Give up reconnecting after this many seconds (default: never).")] = None,
    resident: Annotated[bool, typer.Option("--resident/--process-per-message", help="Handle messages in a resident, warm ClientApp process (default), or let Flower start a new process for each message.")] = True,
) -> None:
    """Run Flower's SuperNode for this device in the foreground (TLS, the device key, its store); exits with its code.

    Checks first that the CA file is a certificate and that the SuperLink answers through TLS
    (waiting, with the reason, while nothing answers); one start per device directory. Exit codes:
    2 bad input or already running, 3 the SuperLink cannot be reached, 4 the device is not enrolled."""
    from fedinterest.client.device_start import start_device
    from fedinterest.client.supernode import supernode_launch

    device = open_device_dir(directory)
    launch = supernode_launch(device, server=server, ca=ca, runtime_port=runtime_port, max_retries=max_retries, max_wait_time=max_wait_time, resident=resident)
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    code = start_device(device, launch, server=server, ca=ca, max_retries=max_retries, max_wait_time=max_wait_time, say=say)  # AlreadyRunning: exit 2
    raise typer.Exit(code=code)


@app.command("install-bundle")
def install_bundle(
    bundle: Annotated[Path, typer.Argument(help="A bundle file from `fedinterest server export`.", show_default=False)],
    directory: DirOpt,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected SHA-256 of the bundle file (default: BUNDLE.sha256 beside it, if there).")] = None,
    allow_other_catalogue: Annotated[bool, typer.Option("--allow-other-catalogue", help="Install a bundle whose catalogue shares no item with the device's.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle's checksums and keep it in the store as the device's latest model.

    A bundle whose catalogue shares no item with the device's is refused (it belongs to another federation)."""
    from fedinterest.client.bundle_install import install_bundle as install

    with open_device_dir(directory).store() as store:
        installed = install(store, bundle, expected_sha256=sha256, allow_other_catalogue=allow_other_catalogue)
    payload = asdict(installed)
    lines = [f"installed bundle {bundle} (SHA-256 {installed.sha256}, {installed.catalogue_items} items) as the latest model"]
    if installed.shared_items != installed.catalogue_items:
        lines.append(f"note: {installed.catalogue_items - installed.shared_items} of the bundle's items are not in the device's catalogue")
    _emit(payload, as_json, lines)


@app.command()
def recommend(
    directory: DirOpt,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
    personalize_steps: PersonalizeOpt = DEFAULT_STEPS,
    as_json: JsonOpt = False,
) -> None:
    """Rank the whole catalogue locally (no network) and print the k best items the user has not seen.

    Before any model arrives, items are ranked by catalogue order (the catalogue's popularity order)."""
    from fedinterest.client.recommend import recommend as recommend_items

    settings = PersonalizationSettings(steps=personalize_steps)
    with open_device_dir(directory).store() as store:
        result = recommend_items(store, k, personalization=settings)
    payload = {"items": [{"item_id": item, "score": score} for item, score in result.items], "model": result.model,
               "history_used": result.history_used, "history_unknown": result.history_unknown}
    lines = [f"{rank:>3}. {item}  ({score:.4f})" for rank, (item, score) in enumerate(result.items, start=1)]
    applied = result.model.get("personalization", {})
    personalized = applied.get("note") or (f"{applied['steps']} steps" if applied.get("steps") else "off")
    if result.model["kind"] == "fallback":
        lines.append(f"no model yet: ranked by {result.model['ranking']}")
    else:
        lines.append(f"model: {result.model['kind']} {result.model['sha256'][:12]}; history items used: {result.history_used}; personalized: {personalized}")
    _emit(payload, as_json, lines)


@app.command()
def budget(
    directory: DirOpt,
    delta: Annotated[float | None, typer.Option(help="Delta to state epsilon at (default: the last run's).")] = None,
    epsilon_budget: Annotated[float | None, typer.Option("--budget", help="Epsilon budget (default: the last run's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Example-level privacy spent by this device (from its ledger), the budget and what remains."""
    with open_device_dir(directory).store() as store:
        report = privacy_budget(store, delta=delta, budget=epsilon_budget)
    payload = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(report).items()}
    payload["epsilon_is_infinite"] = math.isinf(report.epsilon)  # a round without noise: no guarantee
    _emit(payload, as_json, [
        f"epsilon spent: {report.epsilon:.4g} at delta {report.delta:g} (example-level, Opacus RDP accountant)",
        f"budget: {report.budget:g}; remaining: {report.remaining:.4g}",
        f"rounds charged: {report.rounds} ({report.steps} DP-SGD steps); settings from: {report.settings_from}",
    ])


@app.command()
def status(directory: DirOpt, as_json: JsonOpt = False) -> None:
    """History size, model, privacy budget, key and connection of this device."""
    from fedinterest.client.device_lifecycle import device_status

    facts = device_status(open_device_dir(directory))
    history, budget, connection, model = facts["history"], facts["budget"], facts["connection"], facts["model"]
    eps = "inf" if budget["epsilon"] is None and budget["rounds"] else f"{budget['epsilon'] or 0:.4g}"
    _emit(facts, as_json, [
        f"device {facts['dir']} (user {facts['user_id'] or 'none yet'})",
        f"history: {history['interactions']} interactions from {history['imports']} import(s), {history['in_catalogue']} in the catalogue of "
        f"{facts['catalogue_items']}" + ("" if history["trainable"] else " (fewer than 3: the device sends empty replies)"),
        "model: " + (f"{model['kind']} {model['sha256'][:12]} received {model['received_at']}" + (f" (run {model['run_id']}, round {model['server_round']})" if model["run_id"] else "") if model else "none yet; recommend ranks by catalogue order"),
        f"privacy: epsilon {eps} spent of {budget['budget']:g} at delta {budget['delta']:g} over {budget['rounds']} round(s); "
        f"policy: at most epsilon {facts['policy']['max_epsilon']:g} at delta {facts['policy']['max_delta']:g}",
        f"key: {facts['key']['fingerprint']} ({facts['key']['public_key']}: what the operator enrolls)",
        f"connection: {connection['state']}" + (f"; last accepted {connection['last_accepted_at']} by {connection['server']} as node {connection['node_id']}" if connection["last_accepted_at"] else ""),
    ])


@app.command("export")
def export_(
    directory: DirOpt,
    out: Annotated[Path, typer.Option("--out", help="The JSON file to write (must not exist; written 0600).", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Write everything this device holds about its user (history, imports, ledger, policy) to one JSON file."""
    from fedinterest.client.device_lifecycle import export_device

    result = export_device(open_device_dir(directory), out)
    _emit(result, as_json, [f"wrote {result['out']}: {result['interactions']} interactions, {result['imports']} import(s), {result['ledger_rounds']} ledger round(s)"])


@app.command()
def forget(
    directory: DirOpt,
    reset_ledger: Annotated[bool, typer.Option("--reset-ledger", help="Also clear the privacy ledger (only for a device handed to another person).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do it: without --yes nothing is deleted.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete the user's history, imports and models from this device; the privacy ledger stays unless --reset-ledger.

    The epsilon already spent stays spent (the updates it paid for were released), so a device
    that keeps its user keeps its ledger. The privacy policy, key and catalogue stay."""
    from fedinterest.client.device_lifecycle import forget_device

    device = open_device_dir(directory)
    if not yes:
        raise UsageError(f"{device.root}: `device forget` deletes the history and models for good; run it again with --yes")
    removed = forget_device(device, reset_ledger=reset_ledger)
    _emit(removed, as_json, [
        f"deleted {removed['store_events']} interactions, {removed['store_imports']} import(s), {removed['store_models']} model(s)"
        + (f" and {removed['ledger_steps']} ledger round(s)" if reset_ledger else "; the privacy ledger is kept (--reset-ledger clears it)")
    ])


@app.command()
def serve(
    directory: DirOpt,
    address: Annotated[str, typer.Option("--address", help="unix:/path.sock or 127.0.0.1:PORT (local only).")] = "127.0.0.1:50151",
    personalize_steps: PersonalizeOpt = DEFAULT_STEPS,
) -> None:
    """Serve ranked items over gRPC (common/ranking.proto) to apps on this device, until interrupted.

    The service offers gRPC server reflection, so standard clients (grpcurl) need no .proto file."""
    from fedinterest.client.ranking_service import start_server

    settings = PersonalizationSettings(steps=personalize_steps)
    device = open_device_dir(directory)
    server, bound = start_server(device.store_path, address, personalization=settings)
    typer.echo(f"ranking service for {device.root} listening on {bound}", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


def main() -> None:
    """Console script `fedinterest-device`: the device commands alone, for an install without the server side."""
    app()
