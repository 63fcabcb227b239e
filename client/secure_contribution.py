"""The device's side of a secure round: Flower's SecAgg+ mod, and what the device puts in it.

Under run-config aggregation "secagg+" the server drives Flower's SecAggPlusWorkflow
(server/secure_rounds.py). Its messages carry Flower's SecAgg+ config record; for them
`secure_aggregation_mod` hands the message to Flower's own `secaggplus_mod`, which does
every cryptographic step (key agreement, Shamir shares, masking, quantization). Only in
the stage that collects masked vectors does the mod call the train handler, with a
legacy FitIns (`fit_instructions` decodes it) and expecting a legacy FitRes back
(`masked_fit_reply`). The mod quantizes and masks that FitRes's parameters and sends no
array in the clear.

What the device puts in the FitRes (`contribution`): the sum of its users' updates, each
clipped to C = user-clip-norm (one user on a real device), plus its share of the
Gaussian noise, N(0, (sigma C)^2 / m) per coordinate, drawn with Opacus's noise function
(`_generate_noise`, secure_mode: the sum of four draws that resists attacks on the
floating-point noise). m is the fewest survivors a completed round sums, computed from
the protocol's own settings in the SecAgg+ state the mod keeps (sampled nodes n, shares
s, reconstruction threshold t: m = t when s >= n, else ceil(n t / s); common/secure_survivors.py
explains why), so the decoded sum always carries noise of variance at
least (sigma C)^2, the noise the server's accountant charges for. The noise generator is seeded from OS entropy (unless
the research-only research-noise-seed is set).
"""

from __future__ import annotations

import math
import secrets
from typing import Any, TypeGuard, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from opacus.optimizers.optimizer import _generate_noise

from fedinterest.client.device_errors import MessageError
from fedinterest.common import wire
from fedinterest.common.run_config import RunConfig
from fedinterest.common.secure_survivors import fewest_survivors

FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"  # Flower's legacy FitIns record names
# Keys of the state secaggplus_mod keeps (flwr.client.mod.secure_aggregation.secaggplus_mod.SecAggPlusState).
SAMPLE_NUMBER, SHARE_NUMBER, THRESHOLD = "sample_num", "share_num", "threshold"


def is_secure(msg: Message) -> bool:
    """Whether `msg` belongs to a SecAgg+ round (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod for the train messages of a secure round; any other message passes unchanged."""
    if msg.metadata.message_type == MessageType.TRAIN and is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def fit_instructions(msg: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The global arrays (by name) and the train config of a secure round's FitIns."""
    config = msg.content.config_records.get(FITINS_CONFIG)
    record = msg.content.array_records.get(FITINS_PARAMETERS)
    if config is None or record is None:
        raise MessageError(f"a secure train message needs the legacy records {FITINS_PARAMETERS!r} and {FITINS_CONFIG!r}")
    names = config.get(wire.SECURE_ARRAY_KEYS)
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    if not isinstance(names, list) or len(names) != len(arrays) or not all(isinstance(n, str) for n in names):
        raise MessageError(f"{wire.SECURE_ARRAY_KEYS!r} must name each of the {len(arrays)} arrays sent")
    keys = cast(list[str], names)  # checked just above: a list of str
    return ArrayRecord({name: torch.from_numpy(np.array(a)) for name, a in zip(keys, arrays)}), config


def _plain_ints(values: list[Any]) -> TypeGuard[list[int]]:
    """Whether every value is an int (a bool, though an int to Python, is not)."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def protocol_min_survivors(context: Context) -> int:
    """m: the fewest devices whose vectors the running SecAgg+ round can sum (from its setup stage's settings)."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    values = [state.get(key) if state is not None else None for key in (SAMPLE_NUMBER, SHARE_NUMBER, THRESHOLD)]
    if not _plain_ints(values) or values[2] < 2 or values[1] < values[2]:
        raise MessageError(f"no SecAgg+ settings (sampled, shares, threshold >= 2) in this node's protocol state (got {values!r})")
    return fewest_survivors(*values)


def contribution(
    global_state: dict[str, torch.Tensor], trained: dict[str, torch.Tensor] | None, num_users: int, *,
    run: RunConfig, noise_multiplier: float, min_survivors: int, server_round: int,
) -> list[np.ndarray]:
    """Sum of the users' clipped updates plus this device's noise share, one float64 array per global array.

    `trained` is global + the mean of the `num_users` clipped updates (client/shard_training.py),
    None when no user trained (the device then contributes its noise alone).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise MessageError(f"{wire.SECURE_NOISE_MULTIPLIER!r} must be a finite number >= 0, got {noise_multiplier!r}")
    std = noise_multiplier * run.user_clip_norm / math.sqrt(min_survivors)
    generator = torch.Generator().manual_seed(_noise_seed(run, server_round))
    shares = []
    for name, base in global_state.items():
        if trained is None:
            summed = torch.zeros(base.shape, dtype=torch.float64)
        else:
            summed = (trained[name].to(torch.float64) - base.to(torch.float64)) * num_users
        shares.append((summed + _generate_noise(std, summed, generator=generator, secure_mode=True)).numpy())
    return shares


def masked_fit_reply(shares: list[np.ndarray], metrics: MetricRecord) -> RecordDict:
    """The legacy FitRes secaggplus_mod masks (weight 1: the server decodes the plain sum), with the usual train metrics beside it."""
    content = compat.fitres_to_recorddict(
        FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(shares), num_examples=1, metrics={}),
        keep_input=False,
    )
    content[wire.METRICS] = metrics
    return content


def _noise_seed(run: RunConfig, server_round: int) -> int:
    if run.noise_seeded:  # research only: reproducible noise, no privacy figure holds
        return int(np.random.SeedSequence([run.research_noise_seed, server_round, 7]).generate_state(1)[0])
    return secrets.randbits(63)


