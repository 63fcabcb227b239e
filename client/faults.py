"""A simulated device acting out the fault the server marked its train message with.

Only a virtual device of Flower's simulation engine (node config `partition-id`, no
`history-db`) honours the mark: a real device must never crash or stall because a
server asked it to, so it logs the mark and trains as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from fedinterest.client.data_source import HISTORY_DB, PARTITION_ID
from fedinterest.client.device_errors import MessageError, ReportableError
from fedinterest.common.run_config import FAULT_MODES
from fedinterest.common.wire import SIMULATED_FAULT

LOG = logging.getLogger("flwr.fedinterest")
# A stalled device sleeps this much past round-timeout, so the server has surely given up on it.
STALL_MARGIN_SECONDS = 2.0


class SimulatedFault(ReportableError, RuntimeError):
    """Raised by a simulated device told to fail (Flower turns it into an error reply; its text is fixed)."""


def requested_fault(node_config: Mapping[str, object], train_config: Mapping[str, object]) -> str | None:
    """The fault this device must act out: the mark's mode in simulation, else None."""
    mode = train_config.get(SIMULATED_FAULT)
    if mode is None:
        return None
    if HISTORY_DB in node_config or PARTITION_ID not in node_config:
        LOG.warning("fedinterest device: ignoring the server's %s=%r: faults are acted out only in simulation", SIMULATED_FAULT, mode)
        return None
    if mode not in FAULT_MODES:
        raise MessageError(f"train config {SIMULATED_FAULT!r} must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
    return str(mode)


def act_out(mode: str, round_timeout: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Fail now ("fail"), or stall past the round's timeout and then fail ("timeout"); never returns."""
    if mode == "timeout":
        # Raise after the stall as well: a reply this late must not reach a later round.
        sleep(round_timeout + STALL_MARGIN_SECONDS)
        raise SimulatedFault(f"simulated timeout: stalled {round_timeout + STALL_MARGIN_SECONDS:g} s (round-timeout {round_timeout:g} s)")
    raise SimulatedFault("simulated device failure (fault-mode fail)")
