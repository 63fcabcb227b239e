"""Device benchmark: local ranking latency, bundle size (ONNX vs TorchScript), peak memory, `serve` throughput.

    python -m fedinterest.benchmarks.device              # measure, print, rewrite docs/benchmarks.md's device section
    python -m fedinterest.benchmarks.device --no-write   # measure and print only

Latency is the whole local ranking of one request on one thread (torch and onnxruntime
both limited to one): score the catalogue after a full 200-item history, mask the
history, take the top 10. Catalogues of 1,682 (ML-100K), 3,706 (ML-1M) and 100,000
items; the weights are random (latency does not depend on their values), the model is
the run-config default (d = 64, 2 blocks, histories of up to 200). Peak memory is that
of a fresh device process doing one thing: importing the device code only, one DP
training round through the ClientApp on a device store, or one `recommend`. It is the
process's own high-water RSS (`VmHWM` of /proc/self/status): Linux's `ru_maxrss` keeps,
across fork and exec, the parent's RSS at the fork, so in a child started by this
(large) benchmark process it reports the parent's size; it is recorded beside, as read.
`serve` throughput is sequential requests (k = 10) from one client over a unix socket
to a `fedinterest device serve` process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fedinterest.benchmarks.report import publish
from fedinterest.common.bundle import OnnxRanker, ScoringHead, export_onnx, model_input, write_bundle
from fedinterest.common.catalogue import write_catalogue
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
CATALOGUES = {"ML-100K": 1682, "ML-1M": 3706, "100k": 100_000}
TARGET_P99_MS = {"ML-1M": 10.0, "100k": 50.0}
HISTORY_LENGTH = 200
TRAIN_HISTORY = 300  # interactions of the device whose training round is measured
COMMAND = "python -m fedinterest.benchmarks.device"


def _ids(n: int) -> list[str]:
    return [f"item-{i}" for i in range(1, n + 1)]


def _model(num_items: int) -> InterestModel:
    torch.manual_seed(0)
    return InterestModel(RunConfig().model_config(num_items)).eval()


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _rank_once(scores_fn, history: np.ndarray) -> np.ndarray:
    """What `client.recommend.rank_unseen` does with a ranker's scores: mask the history, top 10."""
    scores = scores_fn(history)
    scores[history] = -np.inf
    top = np.argpartition(-scores, 9)[:10]
    return top[np.argsort(-scores[top])]


def _time(fn, history: np.ndarray, requests: int) -> dict[str, float]:
    """p50/p99 of wall-clock and of this thread's CPU time per request (ms).

    Both rankers compute on the calling thread (one intra-op thread), so CPU time is the
    request's own cost; wall time adds whatever the machine's other work takes from it.
    """
    for _ in range(20):
        fn(history)
    wall, cpu = [], []
    for _ in range(requests):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn(history)
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    (wall50, wall99), (cpu50, cpu99) = _percentiles(wall), _percentiles(cpu)
    return {"p50_ms": wall50, "p99_ms": wall99, "cpu_p50_ms": cpu50, "cpu_p99_ms": cpu99}


def measure_format(name: str, num_items: int, requests: int, workdir: Path) -> dict:
    """Latency and size of the ONNX ranker (the bundle's) and of TorchScript for one catalogue size."""
    model = _model(num_items)
    history = np.random.default_rng(0).choice(np.arange(1, num_items + 1), size=HISTORY_LENGTH, replace=False)
    onnx_bytes = export_onnx(model)
    onnx_ranker = OnnxRanker(onnx_bytes, model.config)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.13 marks TorchScript deprecated; measured here for the comparison
        example = torch.from_numpy(model_input(history, model.config.max_len))
        scripted = torch.jit.trace(ScoringHead(model), example)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)

    @torch.no_grad()
    def torchscript_scores(h: np.ndarray) -> np.ndarray:
        scores = scripted(torch.from_numpy(model_input(h, model.config.max_len))).numpy().copy()
        scores[0] = -np.inf
        return scores

    bundle = write_bundle(workdir / f"{name}.bundle", state_dict=model.state_dict(), model_config=model.config,
                          catalogue_ids=_ids(num_items), model_card={"benchmark": "random weights"})
    onnx = _time(lambda h: _rank_once(onnx_ranker.scores, h), history, requests)
    torchscript = _time(lambda h: _rank_once(torchscript_scores, h), history, requests)
    return {
        "catalogue": name, "items": num_items, "requests": requests,
        **{f"onnx_{k}": v for k, v in onnx.items()}, **{f"torchscript_{k}": v for k, v in torchscript.items()},
        "onnx_bytes": len(onnx_bytes), "torchscript_bytes": len(buffer.getvalue()), "bundle_bytes": bundle.stat().st_size,
    }


# ----------------------------------------------------------------------------- device processes


def _prepare_device(workdir: Path, num_items: int) -> Path:
    """A device directory over `num_items` items with a TRAIN_HISTORY-item history and an installed bundle."""
    from fedinterest.client.device_dir import init_device_dir
    from fedinterest.client.ingest import ingest_file

    catalogue = write_catalogue(workdir / f"catalogue-{num_items}.txt", _ids(num_items))
    device = init_device_dir(workdir / f"device-{num_items}", catalogue)
    rng = np.random.default_rng(1)
    items = rng.choice(np.arange(1, num_items + 1), size=TRAIN_HISTORY, replace=False)
    history = workdir / f"history-{num_items}.csv"
    history.write_text("user,item,timestamp\n" + "".join(f"u1,item-{i},{t}\n" for t, i in enumerate(items)), encoding="utf-8")
    with device.store() as store:
        ingest_file(store, history)
        bundle = workdir / f"{'100k' if num_items == 100_000 else num_items}-device.bundle"
        model = _model(num_items)
        write_bundle(bundle, state_dict=model.state_dict(), model_config=model.config, catalogue_ids=_ids(num_items), model_card={})
        store.save_model("bundle", bundle.read_bytes(), {})
    return device.root


def _worker(kind: str, device_dir: Path) -> None:
    """One device process doing `kind`; prints its peak RSS in MiB as JSON."""
    torch.set_num_threads(1)
    from fedinterest.client.app import app  # noqa: F401  -- the device code a SuperNode's ClientApp process loads
    from fedinterest.client.device_dir import open_device_dir
    from fedinterest.client.recommend import recommend

    device = open_device_dir(device_dir)
    if kind == "train":
        _train_round(device.store_path)
    elif kind == "recommend":
        with device.store() as store:
            recommend(store, 10)
    print(json.dumps({"hwm_mib": _vm_hwm_kib() / 1024, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _vm_hwm_kib() -> float:
    """Peak resident set of this process's own address space (reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def _train_round(store_path: Path) -> None:
    """One round of DP training through the real ClientApp handler, as a SuperNode delivers it."""
    from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
    from flwr.app.message import make_message

    from fedinterest.client.app import app
    from fedinterest.client.data_source import HISTORY_DB
    from fedinterest.client.device_store import DeviceStore
    from fedinterest.common import wire

    with DeviceStore(store_path) as store:
        num_items = len(store.catalogue())
    run = RunConfig(dataset="deployed", num_items=num_items)
    model = InterestModel(run.model_config(num_items))
    metadata = Metadata(run_id=1, message_id="bench", src_node_id=1, dst_node_id=2, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=DEFAULT_TTL, message_type="train")
    content = RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    context = Context(run_id=1, node_id=2, node_config={HISTORY_DB: str(store_path)}, state=RecordDict(), run_config=run.to_flower())
    reply = app(make_message(metadata, content), context)
    if reply.has_error() or reply.content.metric_records[wire.METRICS][wire.REFUSED]:
        raise SystemExit(f"the training round did not train: {reply.error if reply.has_error() else 'refused'}")


def _peak(kind: str, device_dir: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-m", "fedinterest.benchmarks.device", "--worker", kind, str(device_dir)],
                            capture_output=True, text=True, timeout=1800, env=_env())
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}


def measure_serve(device_dir: Path, seconds: float) -> dict:
    """Sequential Recommend requests per second against a real `fedinterest device serve` process."""
    import grpc

    from fedinterest.common import ranking_pb2, ranking_pb2_grpc

    socket = device_dir / "bench.sock"
    # `fedinterest device serve`, through the device command group alone.
    command = [sys.executable, "-c", "import sys; from fedinterest.client.device_cli import app; sys.argv[0] = 'device'; app()",
               "serve", "--dir", str(device_dir), "--address", f"unix:{socket}"]
    server = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = ranking_pb2_grpc.RankingStub(channel)
            for _ in range(20):
                stub.Recommend(ranking_pb2.RecommendRequest(k=10), timeout=60)
            count, latencies, start = 0, [], time.perf_counter()
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                stub.Recommend(ranking_pb2.RecommendRequest(k=10), timeout=60)
                latencies.append(time.perf_counter() - t0)
                count += 1
            elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    p50, p99 = _percentiles(latencies)
    return {"requests": count, "seconds": elapsed, "rps": count / elapsed, "p50_ms": p50, "p99_ms": p99}


# ----------------------------------------------------------------------------- report


def _commit() -> str:
    """Short HEAD, "+dirty" when the device code or this script has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()

    dirty = git("status", "--porcelain", "--", "client", "common", "benchmarks/device.py")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def table(results: dict) -> str:
    """The markdown section of docs/benchmarks.md."""
    commit, rows = results["commit"], results["latency"]
    lines = [
        f"Command: `{COMMAND}` on commit `{commit}`; {results['machine']}; load average {results['load']} (start / end: "
        "the 2 cores were shared with other work, which inflates p99). Random weights (latency does not depend on",
        "their values), model of the default run config (d = 64, 2 blocks, histories of up to 200 items); one request =",
        f"score the catalogue after a full {HISTORY_LENGTH}-item history, mask it, take the top 10; "
        f"{rows[0]['requests']} timed requests after 20 warm-up ones, one thread.",
        "",
        "Wall = elapsed time of the request; CPU = the ranking thread's own CPU time (what the request costs, without the",
        "time the shared machine's other work took from it). Targets are judged on wall-clock p99.",
        "",
        "| catalogue | items | ONNX wall p50 / p99 (ms) | ONNX CPU p50 / p99 (ms) | TorchScript wall p50 / p99 (ms) | "
        "TorchScript CPU p50 / p99 (ms) | target p99 | ONNX model | TorchScript model | bundle file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = TARGET_P99_MS.get(row["catalogue"])
        verdict = "-" if target is None else f"< {target:g} ms: {'met' if row['onnx_p99_ms'] < target else 'MISSED'}"
        lines.append(
            f"| {row['catalogue']} | {row['items']:,} | {row['onnx_p50_ms']:.2f} / {row['onnx_p99_ms']:.2f} | "
            f"{row['onnx_cpu_p50_ms']:.2f} / {row['onnx_cpu_p99_ms']:.2f} | "
            f"{row['torchscript_p50_ms']:.2f} / {row['torchscript_p99_ms']:.2f} | "
            f"{row['torchscript_cpu_p50_ms']:.2f} / {row['torchscript_cpu_p99_ms']:.2f} | {verdict} | {_mib(row['onnx_bytes'])} | "
            f"{_mib(row['torchscript_bytes'])} | {_mib(row['bundle_bytes'])} |"
        )
    memory, serve = results["memory"], results["serve"]
    lines += [
        "",
        f"Peak memory of a fresh device process, catalogue of {memory['items']:,} items unless stated, commit `{commit}`. "
        "Peak RSS is the process's own high-water mark (`VmHWM`); `ru_maxrss` as read in the same process is beside it, "
        "but on Linux it carries over the RSS the benchmark process had when it forked the worker, so it is an upper bound only.",
        "",
        "| device process | peak RSS (VmHWM) | ru_maxrss |",
        "|---|---|---|",
        *(f"| {label} | {memory[key]['hwm_mib']:.1f} MiB | {memory[key]['maxrss_mib']:.1f} MiB |" for key, label in (
            ("imports", "imports only (ClientApp, store, ranking code)"),
            ("train", f"one DP training round through the ClientApp ({TRAIN_HISTORY}-item history, default run config)"),
            ("recommend", "`recommend` from the installed bundle"),
            ("recommend_100k", "`recommend` from a bundle of 100,000 items"),
        )),
        "",
        f"`fedinterest device serve` over a unix socket ({serve['items']:,} items, bundle model, k = 10, one client, "
        f"sequential): **{serve['rps']:.0f} requests/s** ({serve['requests']} requests in {serve['seconds']:.1f} s; "
        f"client-side latency p50 {serve['p50_ms']:.2f} ms, p99 {serve['p99_ms']:.2f} ms), commit `{commit}`.",
    ]
    return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def run(requests: int, serve_seconds: float, include_100k: bool) -> dict:
    """Every measurement of this benchmark."""
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    catalogues = {k: v for k, v in CATALOGUES.items() if include_100k or v < 100_000}
    with tempfile.TemporaryDirectory(prefix="fedinterest-device-bench-") as tmp:
        workdir = Path(tmp)
        print("peak memory: device processes", file=sys.stderr)
        device = _prepare_device(workdir, CATALOGUES["ML-1M"])
        # Before the latency runs grow this process: a worker's ru_maxrss starts from this process's RSS.
        memory = {"items": CATALOGUES["ML-1M"], "imports": _peak("imports", device), "train": _peak("train", device),
                  "recommend": _peak("recommend", device)}
        nothing = {"hwm_mib": float("nan"), "maxrss_mib": float("nan")}
        memory["recommend_100k"] = _peak("recommend", _prepare_device(workdir, CATALOGUES["100k"])) if include_100k else nothing
        latency = []
        for name, items in catalogues.items():
            print(f"latency and size: {name} ({items:,} items)", file=sys.stderr)
            latency.append(measure_format(name, items, requests, workdir))
        print("serve throughput", file=sys.stderr)
        serve = {"items": CATALOGUES["ML-1M"], **measure_serve(device, serve_seconds)}
    return {"commit": _commit(), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
            "load": f"{load_start:.1f} / {os.getloadavg()[0]:.1f}",
            "latency": latency, "memory": memory, "serve": serve}


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and (unless --no-write) rewrite the device section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="timed ranking requests per catalogue and format")
    parser.add_argument("--serve-seconds", type=float, default=10.0, help="how long to send requests to `serve`")
    parser.add_argument("--skip-100k", action="store_true", help="leave out the 100,000-item catalogue")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DEVICE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], Path(args.worker[1]))
        return
    results = run(args.requests, args.serve_seconds, include_100k=not args.skip_100k)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = table(results)
    if args.no_write:
        print(text)
    else:
        publish(BENCHMARKS_MD, "device", "## Device: local ranking, bundle, memory, `serve` (deployment issue)\n\n" + text)


if __name__ == "__main__":
    main()
