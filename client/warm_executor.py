"""A resident ClientApp process for a device: Flower's SuperExec loop with a warm fork executor.

Flower 1.41's SuperNode, in its default `subprocess` isolation, starts `flower-superexec`,
which starts a new `flwr-clientapp` process for every message; each one imports torch,
Opacus and the app before it can train (20-60 s a message on a loaded 2-core machine,
issue 16). Flower has no resident ClientApp outside its Kubernetes warm pools, but its
SuperExec takes an executor (`flwr.supercore.superexec.executor.Executor`). So
`device start` runs the SuperNode with `--isolation process` and this process beside it:

- it imports the ClientApp and everything it needs once, then runs Flower's own
  `run_superexec` loop (AcquireTask from the SuperNode's Runtime API);
- its executor forks this warm process for each ClientApp task, and the child runs
  Flower's own `run_clientapp` (the body of `flwr-clientapp`) with the task's token,
  then exits. A message therefore still gets a fresh process (no state leaks from one
  message to the next, a crash ends one task), without the cost of starting one.

`run_superexec` picks its executor with `get_executor`; that name is replaced in its
module for this process only (the one hook Flower leaves for a local executor).
Other task types are passed to Flower's SubprocessExecutor.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

# The app is imported by the executor on start, before any fork (see main()).
APP_MODULE = "fedinterest.client.app"


class WarmForkExecutor:
    """Flower's Executor protocol: ClientApp tasks run in a fork of this warm process."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):  # noqa: ANN001, ANN201 (Flower's protocol)
        return self._fallback.get_eligible_capacity(supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:  # noqa: ANN001
        return None

    def launch(self, spec):  # noqa: ANN001, ANN201
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        self.reconcile()
        pid = os.fork()
        if pid == 0:  # the child: one ClientApp task, then exit; never back into the parent's loop
            code = 1
            try:
                code = _run_task(spec)
            finally:
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes (no zombies)."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._fallback.close()


def _run_task(spec) -> int:  # noqa: ANN001
    """In the forked child: what `flwr-clientapp --token ...` does, from the warm state."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # the parent's SuperExec handlers are not this task's
    from flwr.supercore import log
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    certificates = Path(spec.root_certificates_path).read_bytes() if spec.root_certificates_path and not spec.insecure else None
    log(20, "Start `flwr-clientapp` task in the resident ClientApp process (pid %d)", os.getpid())
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
            certificates=certificates, parent_pid=spec.parent_pid, runtime_dependency_install=spec.runtime_dependency_install,
        )
    except SystemExit as done:  # flwr_exit ends the task with sys.exit
        return int(done.code or 0) if isinstance(done.code, int) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m fedinterest.client.warm_executor --runtime-api-address HOST:PORT [--parent-pid PID]`."""
    parser = argparse.ArgumentParser(description="Resident ClientApp executor of a device's SuperNode (Flower SuperExec loop).")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")
    args = parser.parse_args(argv)

    import importlib

    importlib.import_module(APP_MODULE)  # torch, Opacus, Flower and the app: once, before any fork
    from flwr.supercore.superexec import run_superexec as superexec

    executor = WarmForkExecutor()
    superexec.get_executor = lambda *_a, **_k: executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address, insecure=True, parent_pid=args.parent_pid,
        runtime_dependency_install=args.allow_runtime_dependency_installation,
    )


if __name__ == "__main__":
    main()
