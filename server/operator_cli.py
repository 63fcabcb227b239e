"""`fedinterest server ...`: the operator's commands for a deployed federation.

Each command parses its options and delegates to one module: deployment.py (init),
superlink.py (start), enrollment.py (enroll/revoke/devices), run_admin.py
(run/status/stop), export.py, report.py. Errors are printed as `error: ...` naming
what and where, with the exit code of every fedinterest command (common/errors.py): 2 for
anything the operator can fix, 1 for `run --wait` whose run did not complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedinterest.common.cli_errors import ReportingGroup
from fedinterest.common.errors import JobFailed, UsageError
from fedinterest.common.run_files import DEVICE_EPSILON_MAX, METRIC_KEYS, NDCG_10
from fedinterest.server.deployment import DEFAULT_HOST, DEFAULT_PORT, ENV_DIR

if TYPE_CHECKING:
    from fedinterest.common.run_files import RoundRow
    from fedinterest.server.deployment import Deployment

app = typer.Typer(
    cls=ReportingGroup,
    help="Operate a deployed federation: deployment directory, SuperLink, devices, runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DirOption = Annotated[
    Path | None,
    typer.Option("--dir", envvar=ENV_DIR, help=f"The deployment directory (made by `server init`); or set {ENV_DIR}."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _deployment(directory: Path | None) -> Deployment:
    from fedinterest.server.deployment import load_deployment

    return load_deployment(directory)


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="The deployment directory to create (must not exist, or be empty).")],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="An IP address or DNS name devices use to reach the server (repeatable); 127.0.0.1 and localhost are always added."),
    ] = None,
    catalogue: Annotated[Path | None, typer.Option("--catalogue", help="The item catalogue: one raw item id per line (line i = item index i).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address the SuperLink listens on. Default loopback only; "
        "give the interface devices use (or 0.0.0.0) to expose it, Control API included.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="The SuperLink's HTTPS port (devices, the operator's flwr commands).")] = DEFAULT_PORT,
    as_json: JsonOption = False,
) -> None:
    """Create a deployment directory: CA, server certificate with the SANs, config, empty enrolment list."""
    from fedinterest.server.certificates import certificate_sans, fingerprint, load_certificate
    from fedinterest.server.deployment import exposure_warning, init_deployment

    deployment = init_deployment(directory, list(san or []), catalogue=catalogue, host=host, port=port)
    ca = load_certificate(deployment.ca_cert)
    facts: dict[str, Any] = {
        "dir": str(deployment.root),
        "config": str(deployment.config_file),
        "ca_certificate": str(deployment.ca_cert),
        "ca_sha256": fingerprint(ca),
        "server_certificate": str(deployment.server_cert),
        "sans": certificate_sans(load_certificate(deployment.server_cert)),
        "listen": f"{deployment.server.host}:{deployment.server.port}",
        "catalogue": str(deployment.catalogue) if deployment.catalogue.is_file() else None,
        "exposed": exposure_warning(deployment.server) is not None,
    }
    warning = exposure_warning(deployment.server)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(facts)
        return
    typer.echo(f"Deployment created in {facts['dir']}")
    typer.echo(f"  config:      {facts['config']}")
    typer.echo(f"  CA:          {facts['ca_certificate']} (give this file to devices: --ca)")
    typer.echo(f"  CA SHA-256:  {facts['ca_sha256']}")
    typer.echo(f"  server cert: {facts['server_certificate']} for {', '.join(facts['sans'])}")
    typer.echo(f"  listens on:  {facts['listen']}" + ("" if facts["exposed"] else " (loopback only: devices on this machine; `--host` to expose it)"))
    typer.echo(f"  catalogue:   {facts['catalogue'] or 'none yet (copy one to catalogue.txt before `server run`)'}")
    typer.echo(f"Next: fedinterest server start --dir {facts['dir']}")


@app.command()
def catalogue(
    source: Annotated[Path, typer.Argument(help="An interactions file listing every item (the operator's own log, a product export).")],
    out: Annotated[Path, typer.Option("--out", help="The catalogue to write (give it to `server init --catalogue` and to devices).")],
    fmt: Annotated[str | None, typer.Option("--format", help="csv, tsv, jsonl (also .json), parquet, ml-100k, ml-1m, sequences (default: from the suffix).")] = None,
    user_col: Annotated[str, typer.Option(help="User column of a csv/tsv/jsonl/parquet file.")] = "user",
    item_col: Annotated[str, typer.Option(help="Item column of a csv/tsv/jsonl/parquet file.")] = "item",
    time_col: Annotated[str, typer.Option(help="Timestamp column (epoch seconds or ISO 8601).")] = "timestamp",
    as_json: JsonOption = False,
) -> None:
    """Build the item catalogue from an interactions file, most popular item first, with its popularity baseline beside it.

    Devices without a model rank by this order; `status` and `report` show the baseline."""
    from fedinterest.common.column_values import ColumnMap
    from fedinterest.common.table_loader import GENERIC_FORMATS, suffix_format
    from fedinterest.server.catalogue_build import build_catalogue

    chosen = fmt or suffix_format(source)
    if chosen is None:
        raise UsageError(f"{source}: cannot tell the format from the file name; pass --format")
    columns = ColumnMap(user=user_col, item=item_col, timestamp=time_col) if chosen in GENERIC_FORMATS else ColumnMap()
    facts = build_catalogue(source, out, fmt=chosen, columns=columns)
    if as_json:
        _print_json(facts)
        return
    popular = facts["popularity_test"] or {}
    typer.echo(f"Wrote {facts['catalogue']}: {facts['items']} items by popularity over {facts['interactions']} interactions")
    typer.echo(f"  popularity baseline (test, {facts['users_evaluated']} users): " + (", ".join(f"{k} {v:.4g}" for k, v in popular.items()) or "-"))
    typer.echo(f"  written beside it: {facts['popularity']}")


@app.command()
def start(directory: DirOption = None) -> None:
    """Run the SuperLink (TLS, SuperNode authentication, SQLite database in DIR) in the foreground."""
    from fedinterest.server.deployment import exposure_warning
    from fedinterest.server.superlink import run_superlink, superlink_command

    deployment = _deployment(directory)
    warning = exposure_warning(deployment.server)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"Starting the SuperLink of {deployment.root} on {deployment.server.host}:{deployment.server.port} (Ctrl-C stops it)", err=True)
    typer.echo("$ " + " ".join(superlink_command(deployment)), err=True)
    code = run_superlink(deployment)
    raise typer.Exit(code)


@app.command()
def enroll(
    public_key: Annotated[Path, typer.Argument(help="The device's public key (OpenSSH EC format, e.g. from `fedinterest device init`).")],
    name: Annotated[str, typer.Option("--name", help="A name for the device (letters, digits, _ . -).")],
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Allow a device to join: register its public key with the running SuperLink under NAME."""
    from fedinterest.server.enrollment import device_json
    from fedinterest.server.enrollment import enroll as do_enroll

    device = do_enroll(_deployment(directory), public_key, name)
    if as_json:
        _print_json(device_json(device))
    else:
        typer.echo(f"Enrolled {device.name}: node {device.node_id}, key {device.key_sha256}")


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="The enrolled device's name.")],
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove a device from the federation (its key is never accepted again)."""
    from fedinterest.server.enrollment import device_json
    from fedinterest.server.enrollment import revoke as do_revoke

    device = do_revoke(_deployment(directory), name)
    if as_json:
        _print_json(device_json(device))
    else:
        typer.echo(f"Revoked {device.name} (node {device.node_id}) at {device.revoked_at}")


@app.command()
def devices(
    directory: DirOption = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked devices.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List enrolled devices with their Flower node id and live status."""
    from fedinterest.server.enrollment import device_rows

    rows, problem = device_rows(_deployment(directory), include_revoked=include_revoked)
    if as_json:
        _print_json({"devices": rows, "status_error": problem})
        return
    if problem:
        typer.echo(f"warning: {problem}", err=True)
    if not rows:
        typer.echo("No devices enrolled (`fedinterest server enroll KEY --name NAME`).")
        return
    typer.echo(f"{'name':<20} {'node id':<21} {'status':<14} {'enrolled':<26} key")
    for row in rows:
        status = row["status"] or "?"
        if row["revoked_at"]:
            status = "revoked"
        typer.echo(f"{row['name']:<20} {row['node_id']:<21} {status:<14} {row['enrolled_at']:<26} {row['key_sha256']}")


@app.command()
def run(
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a run default, e.g. --set num-server-rounds=5 --set dim=16 (repeatable)."),
    ] = None,
    directory: DirOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run finishes, printing each round; exit 1 unless it completed.")] = False,
    timeout_minutes: Annotated[float, typer.Option("--timeout-minutes", help="With --wait: give up waiting after this long.")] = 600.0,
    as_json: JsonOption = False,
) -> None:
    """Submit a federated training run of this project's app to the SuperLink; prints the run id.

    Before submitting, warns when the enrolled devices' privacy budgets cannot cover the rounds.
    With --wait, exits 1 unless the run completed and at least one device's update was aggregated."""
    from fedinterest.server.run_admin import check_run, submit_run, wait_finished

    deployment = _deployment(directory)
    _, warnings = check_run(deployment, list(set_ or []))
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    submitted = submit_run(deployment, list(set_ or []), warnings)
    facts: dict[str, Any] = {"run_id": str(submitted.run_id), "run": submitted.run_dir.name, "run_dir": str(submitted.run_dir), "warnings": list(warnings)}
    if not as_json:
        typer.echo(f"Submitted run {submitted.run_id} ({submitted.run_dir.name}); follow it with `fedinterest server status {submitted.run_id}`")
    if wait:
        # Live progress goes to stderr, so --json keeps stdout one JSON document.
        state = wait_finished(deployment, str(submitted.run_id), timeout_minutes * 60, on_round=_echo_round)
        facts["state"] = state
        if not as_json:
            _echo_state(state)
    if as_json:
        _print_json(facts)
    if wait and not facts["state"]["completed"]:
        state = facts["state"]
        why = state["outcome_why"] if state["finished"] else f"not finished after {timeout_minutes:g} minutes ({state['status'] or 'state unknown'})"
        raise JobFailed(f"run {state['run_id']} ({state['run']}) did not complete: {why or state['status']}")


def _echo_round(row: RoundRow) -> None:
    """One line per finished round, as `run --wait` follows the run."""
    shown = ", ".join(f"{k} {row.number(k):.4g}" for k in ("train_loss", "epsilon_max", NDCG_10) if row.number(k) is not None)
    typer.echo(
        f"round {row.round}: {row.get('answered')} of {row.get('sampled')} devices answered, {row.get('refused')} refused, "
        f"{row.get('failed')} failed, {row.get('rejected')} rejected" + (f"; {shown}" if shown else "; no update aggregated")
        + (f" ({row.number('seconds'):.0f} s)" if row.number("seconds") is not None else ""),
        err=True,
    )


def _number(value: Any, missing: str) -> str:
    """A reported figure for people: 4 significant digits, "inf" kept, `missing` for None."""
    if value is None:
        return missing
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _echo_state(state: dict[str, Any]) -> None:
    flower = state["flower"]
    typer.echo(f"Run {state['run_id']} ({state['run']}): {state['status'] or 'state unknown'}")
    if state.get("outcome_why"):
        typer.echo(f"  warning: {state['outcome_why']}")
    for warning in state.get("warnings") or []:
        typer.echo(f"  warned at submission: {warning}")
    if flower.get("status-details") not in (None, "", "N/A"):
        typer.echo(f"  details: {flower['status-details']}")
    if flower.get("error"):
        typer.echo(f"  {flower['error']}")
    devices = state["devices"]
    typer.echo(f"  rounds: {state['rounds_done']} of {state['rounds_planned']}")
    typer.echo(
        f"  device replies: {devices['answered']} answered, {devices['refused']} refused (budget), "
        f"{devices['failed']} failed, {devices['rejected']} rejected, of {devices['sampled']} sampled"
    )
    latest = state["latest_round"]
    if latest:
        shown = {k: latest.get(k) for k in ("train_loss", *METRIC_KEYS) if latest.get(k) is not None}
        typer.echo(f"  latest round {latest.get('round')}: " + (", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "no metrics"))
    privacy = state["privacy"]
    if privacy["dp"]:
        typer.echo(
            f"  privacy: device epsilon max {_number(privacy['epsilon_max'], 'not reported yet')}"
            f" (mean {_number(privacy['epsilon_mean'], '-')}) at delta {privacy['delta']:g}, budget {privacy['epsilon_budget']:g}"
        )
    else:
        typer.echo("  privacy: DP off (noise-multiplier = 0), epsilon is infinite")
    final = state["final"]
    if final and final.get("test"):
        typer.echo("  final test: " + ", ".join(f"{k} {v:.4g}" for k, v in final["test"].items()))
    popular = (state.get("popularity_baseline") or {}).get("popularity_test")
    if popular:
        typer.echo("  popularity baseline (test, on the catalogue's source data, not the devices'): "
                   + ", ".join(f"{k} {popular[k]:.4g}" for k in METRIC_KEYS if k in popular))
    for reason in state.get("device_reasons") or []:
        typer.echo(f"  {reason}")


@app.command()
def status(
    run_ref: Annotated[str | None, typer.Argument(metavar="[RUN]", help="Flower run id or run directory name (default: the latest run).")] = None,
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's state from Flower (`flwr ls`) and its progress: rounds, device replies, metrics, privacy spent."""
    from fedinterest.server.run_admin import run_state

    state = run_state(_deployment(directory), run_ref)
    if as_json:
        _print_json(state)
    else:
        _echo_state(state)


@app.command()
def stop(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Flower run id or run directory name.")],
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop a run that is still pending or running."""
    from fedinterest.server.run_admin import stop as do_stop

    result = do_stop(_deployment(directory), run_ref)
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"Run {result['run_id']} ({result['run']}): {result['status']}")


@app.command("export")
def export_(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Flower run id or run directory name.")],
    out: Annotated[Path, typer.Option("--out", help="The bundle file to write (a .sha256 file is written beside it).")],
    directory: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a device bundle of a finished run: global model, catalogue, model card, checksum."""
    from fedinterest.server.export import export_run

    result = export_run(_deployment(directory), run_ref, out)
    if as_json:
        _print_json(result)
        return
    card = result["card"]["privacy"]
    typer.echo(f"Wrote {result['bundle']} ({result['bytes']} bytes, sha256 {result['sha256']})")
    typer.echo(f"  run {result['run_id']} ({result['run']}), global model after round {result['round']}")
    typer.echo(f"  privacy: device epsilon max {_number(card[DEVICE_EPSILON_MAX], '-')} at delta {card['delta']:g} ({'DP-SGD on' if card['dp'] else 'DP off'})")


@app.command()
def report(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="Flower run id or run directory name.")],
    directory: DirOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write report.md and the plots (default: the run directory).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a run's plots and summary table (report.md) and print the table."""
    from fedinterest.server.report import write_report

    facts, text, _ = write_report(_deployment(directory), run_ref, out)
    if as_json:
        _print_json(facts)
    else:
        sys.stdout.write(text)
        typer.echo(f"Written: {', '.join(facts['files'])}")
