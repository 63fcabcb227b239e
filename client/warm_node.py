"""What a simulation's ClientApp process keeps between messages: open ledgers and a model template.

Flower's simulation engine runs the messages of every virtual node in a few long-lived Ray
actor processes. Opening a node's SQLite ledger for each message and closing it after
(the close checkpoints the WAL: two more fsyncs) and building a fresh model with its
random initialisation were about a third of a ClientApp's time at one user per node
(docs/benchmarks.md, "Cohort simulation speed"). So a process keeps them warm:

- **Ledgers**: one open `PrivacyLedger` per (Flower run id, ledger file), for the file
  ledgers of simulated nodes only (a real device's ledger lives in its device store and
  each of its messages runs in a fresh fork: client/warm_executor.py). Reused only in the
  process that opened it (a fork never writes through its parent's connection) and while
  the path still names the file it opened (same device and inode: a ledger deleted or
  replaced since is opened afresh, never written through a stale handle). A message that
  raises drops its node's connection, so the next one starts as the cold path did. At
  most `_capacity()` are kept (three file descriptors each: database, WAL, shared
  memory), least recently used closed first. What is written is unchanged: every charge
  is its own committed transaction under `synchronous=FULL`; keeping the connection
  open only saves the open and the close, and the `-wal` file stays beside the ledger
  while the process lives (SQLite readers see every committed row).
- **The model**: one model per model config, built once and handed to each message in
  turn (the caller loads the message's weights into it: every parameter and persistent
  buffer). Before it is handed out again it is checked against what it was when built:
  the same modules and parameters, every parameter trainable, no hook added (training
  adds and removes hooks and freezes layers for a pass: client/user_gradients.py); any
  difference and a new one is built. Its gradients are dropped and it is put back in
  training mode, as a new model is. The global torch generator is no longer drawn from by
  a fresh initialisation on every message; training reseeds it each round anyway
  (client/shard_training.py).

Both are kept per thread (SQLite connections belong to the thread that opened them; a
model is never handed to two messages at once); Flower runs a node's messages one at a
time in an actor's thread.

FEDINTEREST_WARM_NODE=off in the environment keeps the cold path (open and close per
message, a new model per message), to measure against (benchmarks/cohort_speed.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr.app import RecordDict

from fedinterest.client.data_source import DeviceData
from fedinterest.client.ledger import PrivacyLedger, open_device_ledger
from fedinterest.common.model import InterestModel
from fedinterest.common.model_config import ModelConfig

SWITCH = "FEDINTEREST_WARM_NODE"  # "off": open, close and build per message
LOG = logging.getLogger("flwr.fedinterest")
_said_off: set[int] = set()  # processes that logged the switch


def enabled() -> bool:
    """Whether this process keeps ledgers and the model warm (read per message: a benchmark may switch it)."""
    if os.environ.get(SWITCH) != "off":
        return True
    if os.getpid() not in _said_off:  # once per process: flwr.log then shows the actors got the switch
        _said_off.add(os.getpid())
        LOG.info("fedinterest: %s=off, this ClientApp process opens the ledger and builds the model per message", SWITCH)
    return False


@dataclass(frozen=True)
class _Held:
    ledger: PrivacyLedger
    pid: int  # the process that opened it
    file: tuple[int, int] | None  # (st_dev, st_ino) of the file it opened


class _ThreadCache(threading.local):
    def __init__(self) -> None:
        self.ledgers: OrderedDict[tuple[int, str], _Held] = OrderedDict()  # (run id, path) -> open ledger, least recent first
        self.model: tuple[ModelConfig, InterestModel, tuple] | None = None  # config, model, its fingerprint when built


_CACHE = _ThreadCache()


@contextmanager
def node_ledger(device: DeviceData, state: RecordDict, run_id: int) -> Iterator[PrivacyLedger]:
    """The node's ledger for one message: kept open across messages for a simulated node's file."""
    if device.store_path is not None or device.ledger_path is None or not enabled():
        with open_device_ledger(device.ledger_path, state) as ledger:
            yield ledger
        return
    key = (run_id, str(device.ledger_path))
    ledger = _open(key, device.ledger_path)
    try:
        yield ledger
    except BaseException:
        _forget(key)
        raise


def fresh_model(config: ModelConfig) -> InterestModel:
    """A model of `config` as a new one would be but for its weights, which are the caller's to load."""
    if not enabled():
        return InterestModel(config)
    held = _CACHE.model
    if held is None or held[0] != config or _fingerprint(held[1]) != held[2]:
        model = InterestModel(config)
        _CACHE.model = held = (config, model, _fingerprint(model))
    model = held[1]
    model.zero_grad(set_to_none=True)
    return model.train()


def _fingerprint(model: InterestModel) -> tuple:
    """The model's structure: modules, parameter and buffer objects, trainable flags, hook counts."""
    return tuple(
        (
            name, type(module),
            tuple((key, id(p), p is not None and p.requires_grad) for key, p in module._parameters.items()),  # a Linear(bias=False) holds None
            tuple((key, id(b)) for key, b in module._buffers.items()),
            *(len(hooks) for hooks in (
                module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
                module._state_dict_hooks, module._state_dict_pre_hooks, module._load_state_dict_pre_hooks,
                module._load_state_dict_post_hooks,
            )),
        )
        for name, module in model.named_modules(remove_duplicate=False)
    )


def forget_all() -> None:
    """Close every ledger this thread holds and drop its model (tests; process exit)."""
    for key in list(_CACHE.ledgers):
        _forget(key)
    _CACHE.model = None


def _open(key: tuple[int, str], path: Path) -> PrivacyLedger:
    ledgers = _CACHE.ledgers
    held = ledgers.get(key)
    if held is not None:
        if held.pid == os.getpid() and held.file is not None and _identity(path) == held.file:
            ledgers.move_to_end(key)
            return held.ledger
        _forget(key)
    ledger = PrivacyLedger(path)
    ledgers[key] = _Held(ledger, os.getpid(), _identity(path))
    while len(ledgers) > _capacity():
        _forget(next(iter(ledgers)))
    return ledger


def _forget(key: tuple[int, str]) -> None:
    held = _CACHE.ledgers.pop(key, None)
    if held is not None and held.pid == os.getpid():  # a parent's connection is not a fork's to close
        held.ledger.close()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _capacity() -> int:
    """Ledgers kept open: an eighth of the descriptor limit at three each leaves most of it to everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 4096 if soft == resource.RLIM_INFINITY else max(8, min(4096, soft // 8))


atexit.register(forget_all)  # a clean exit checkpoints every WAL back into its ledger
