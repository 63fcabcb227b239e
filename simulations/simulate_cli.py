"""`fedinterest simulate`: run a federated simulation from a config file and report it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedinterest.common.run_files import HIT_RATE_10, NDCG_10, RoundRow
from fedinterest.simulations.flower_run import SimulationFailed
from fedinterest.simulations.run_directory import PreparedRun
from fedinterest.simulations.simulate import SimulationResult, run_simulation
from fedinterest.simulations.simulation_config import SimulationConfigError, resolve_config, resume_config


def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="Simulation TOML: a [run] table of run-config keys and a [federation] table.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, e.g. --set noise-multiplier=0.5 --set dataset=ml-100k (repeatable)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Parent directory of the run directory.")] = Path("runs"),
    timeout_minutes: Annotated[float | None, typer.Option(help="Stop the run and fail after this many minutes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="Resume an interrupted run directory in place, with its resolved config (instead of CONFIG)."),
    ] = None,
) -> None:
    """Run the ServerApp and ClientApps in Flower's simulation engine (one virtual device per
    user) and write metrics, checkpoints, a privacy report and plots to a run directory.
    With --resume RUN_DIR, continue an interrupted run after its last checkpoint."""
    console = Console(stderr=True)
    overrides = list(set_ or [])
    # A SimulationConfigError or DataFormatError (exit 2) or SimulationFailed (exit 1) ends the
    # command by the rule of common/errors.py, applied by the `fedinterest` group.
    if (config is None) == (resume is None):
        raise SimulationConfigError("give either CONFIG (a new run) or --resume RUN_DIR (continue one), not both or neither")
    if config is not None:
        resolved = resolve_config(config, overrides)
    else:
        assert resume is not None  # exactly one of the two, checked just above
        resolved = resume_config(resume, overrides)

    run = resolved.run
    total = run.num_server_rounds
    live = console.is_terminal and not as_json
    with Progress(
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
        console=console, disable=not live,
    ) as progress:
        task = progress.add_task("simulate", total=total, status="starting the SuperLink and Ray...")

        def say(text: str) -> None:
            if not as_json:
                console.print(text, soft_wrap=True, highlight=False)  # above the live bar when there is one

        def on_prepared(prepared: PreparedRun) -> None:
            fed = prepared.config.federation
            if run.users_per_node > 1:  # shards: each node stands for users-per-node devices
                nodes = f"{fed.num_supernodes} virtual nodes of up to {run.users_per_node:,} users"
                cohort = f"about {run.clients_per_round:,} users"
            else:
                nodes, cohort = f"{fed.num_supernodes} virtual devices", f"{min(run.clients_per_round, fed.num_supernodes or 0)} devices"
            say(f"[dim]run dir {prepared.run_dir}; {nodes}, {fed.client_cpus} CPU each; {total} rounds of {cohort}[/dim]")

        def on_started(run_id: int) -> None:
            say(f"[dim]Flower run {run_id} started (log: flwr.log)[/dim]")
            progress.update(task, status="waiting for round 1...")

        def on_round(row: RoundRow) -> None:
            status = round_status(row)
            progress.update(task, completed=min(row.round, total), status=status)
            if not live and not as_json:
                # Logs and CI have no live bar: one line per round instead.
                console.print(f"round {row.round}/{total}: {status}", soft_wrap=True, highlight=False)

        try:
            head = [str(config)] if config is not None else ["--resume", str(resume)]
            result = run_simulation(
                resolved, out, argv=[*head, *(x for item in overrides for x in ("--set", item)), "--out", str(out)],
                resume=resume is not None,
                on_prepared=on_prepared, on_started=on_started, on_round=on_round,
                timeout=None if timeout_minutes is None else timeout_minutes * 60,
            )
        except SimulationFailed as err:
            # What a failed run leaves to look at; the reason is the `error:` line after it (exit 1).
            progress.stop()
            console.print(f"run dir: {err.run_dir}", soft_wrap=True, highlight=False)
            if err.log_tail:
                console.print("last lines of flwr.log:", highlight=False)
                console.print(err.log_tail, markup=False, highlight=False, soft_wrap=True)
            if as_json:
                typer.echo(json.dumps({"success": False, "reason": err.reason, "run_dir": str(err.run_dir)}, indent=2))
            raise

    if as_json:
        typer.echo(json.dumps(result_payload(result), indent=2))
        return
    print_table(result)


def round_status(row: RoundRow) -> str:
    """One round in one line: devices, loss, latest NDCG@10, device epsilon."""

    def num(key: str, spec: str) -> str:
        value = row.number(key)
        if value is None:
            return "-"
        return "inf" if math.isinf(value) else format(value, spec)

    devices = f"sampled {row.get('sampled') or 0} answered {row.get('answered') or 0} refused {row.get('refused') or 0}"
    failed = sum(int(row.number(k) or 0) for k in ("failed", "rejected"))
    if failed:
        devices += f" failed/rejected {failed}"
    line = (
        f"{devices} | loss {num('train_loss', '.4f')} | NDCG@10 {num(NDCG_10, '.4f')} | "
        f"eps max {num('epsilon_max', '.3g')} mean {num('epsilon_mean', '.3g')}"
    )
    return line + (f" | user eps {num('user_epsilon', '.3g')}" if row.number("user_epsilon") is not None else "")


def result_payload(result: SimulationResult) -> dict[str, Any]:
    """What `--json` prints."""
    return {"success": True, "run_dir": str(result.run_dir), "run_id": str(result.run_id), **result.summary, "privacy": result.privacy}


def print_table(result: SimulationResult) -> None:
    """The final table: quality of the global model, device epsilon, wall time."""
    s = result.summary
    typer.echo(f"results in {result.run_dir}")
    keys = (HIT_RATE_10, NDCG_10, "ndcg@20", "mrr")
    typer.echo(f"{'split':<8}" + "".join(f"{k.upper() if k != 'mrr' else 'MRR':>9}" for k in keys))
    for split in ("valid", "test"):
        metrics = s[split]
        if metrics:
            typer.echo(f"{split:<8}" + "".join(_cell(metrics.get(k)) for k in keys))
    best = s.get("best_valid")
    if best and best["round"] != s["rounds"]:
        typer.echo(f"{'best':<8}" + "".join(_cell(best["test"].get(k)) for k in keys) + f"   (test at round {best['round']}, the best validation NDCG@10)")
    typer.echo(f"{'popular.':<8}" + "".join(_cell(s["popularity_test"].get(k)) for k in keys) + "   (popularity baseline, test)")
    private = s.get("private_popularity_test")
    if private:
        typer.echo(f"{'priv.pop':<8}" + "".join(_cell(private.get(k)) for k in keys) + f"   (popularity released at the same user-level epsilon {_fmt(private['epsilon'])}, test)")
    if s.get("device_dp", True):
        eps = f"max {_fmt(s['epsilon_max'])}, mean {_fmt(s['epsilon_mean'])}"
        typer.echo(
            f"device epsilon {eps} (delta {s['delta']:g}, budget {s['epsilon_budget']:g}); "
            f"refusals: {s['refused_device_rounds']} device-rounds"
        )
    else:
        typer.echo("no example-level DP on the devices (noise-multiplier 0): layer 1 is off")
    user = s.get("user_level")
    if user:
        typer.echo(f"user-level epsilon {_fmt(user['epsilon'])} (delta {user['delta']:.3g}, budget {user['epsilon_budget']:g}; DP-FedAvg on the server)")
    if s.get("stopped_early"):
        typer.echo(f"stopped early ({s['stopped_early']}): one more round would have passed the user-level budget")
    nodes = f"{s['devices']} virtual nodes of up to {s['users_per_node']:,} users" if s.get("users_per_node", 1) > 1 else f"{s['devices']} devices"
    typer.echo(f"{s['rounds']} rounds, {nodes}, wall time {s['wall_seconds']:.0f} s")
    if s.get("privacy_warning"):
        typer.echo(f"warning: {s['privacy_warning']}")
    if s["failed_replies"] or s["rejected_replies"]:
        typer.echo(f"warning: {s['failed_replies']} device replies failed and {s['rejected_replies']} were rejected (see flwr.log)")


def _cell(value: Any) -> str:
    return f"{value:>9.4f}" if isinstance(value, (int, float)) else f"{'-':>9}"


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
