"""The federated run's configuration, parsed once from Flower's run config and checked.

Flower hands both apps a flat mapping with kebab-case keys (pyproject's
`[tool.flwr.app.config]`, overridden by `--run-config`). `RunConfig.from_flower`
turns it into this frozen dataclass; nothing else reads `run_config[...]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from fedinterest.common.datasets import DatasetSpec
from fedinterest.common.item_attributes import item_attribute_rows
from fedinterest.common.model_config import ITEM_VECTORS, ModelConfig
from fedinterest.common.synthetic import SyntheticConfig

if TYPE_CHECKING:  # the annotation only: this module itself does not import Flower
    from flwr.app import UserConfig

# Integers beyond this are typos or attacks, never settings (and would overflow numpy/torch).
MAX_INT = 2**31 - 1
# The dataset of a run on real devices (deployment): each device holds its own history.
DEPLOYED = "deployed"
STRATEGIES = ("fedavg", "fedadam", "fedyogi", "fedprox", "fedavgm", "fedmedian", "fedtrimmedavg", "krum")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")  # aggregate individual updates, not a mean
# How a device picked by fault-fraction misbehaves in simulation: raise, or stall past round-timeout.
FAULT_MODES = ("fail", "timeout")
# The device's optimizer. Adam (the default) is what the centralized model trains with;
# plain SGD keeps DP noise proportional to the learning rate, where Adam's per-coordinate
# scaling turns noise-dominated coordinates into steps of the full learning rate.
LOCAL_OPTIMIZERS = ("adam", "sgd")
USER_ACCOUNTANTS = ("prv", "rdp")  # Opacus accountants of layer 2
# How the server combines a round's updates: in the clear, or with Flower's SecAgg+
# (server/secure_rounds.py), where it learns only their sum and the devices add the noise.
AGGREGATIONS = ("plain", "secagg+")
# What a key is to the rest of the system, declared on its field (one source of truth,
# read with `keys_with`): the operator's deployment sets a run-managed key for each run
# and refuses it in a run's --set (server/deployment.py); an unhashed key may differ
# between a checkpoint and the run resuming from it (server/checkpoint.py); a
# resume-overridable key is the only --set that `fedinterest simulate --resume` takes.
RUN_MANAGED, UNHASHED, RESUME_OVERRIDABLE = "run-managed", "unhashed", "resume-overridable"


def _with_roles(default: object, *roles: str):  # a dataclass field: its type is the annotation beside it
    return field(default=default, metadata={"roles": frozenset(roles)})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run; field `a_b` is run-config key `a-b`."""

    # Data: one user = one partition. dataset = "deployed": real devices hold the data
    # (node config history-db); the server loads none and takes the catalogue size from
    # num-items.
    dataset: str = _with_roles("synthetic", RUN_MANAGED)
    data_path: str = _with_roles("", RUN_MANAGED)
    synthetic_users: int = _with_roles(600, RUN_MANAGED)
    synthetic_items: int = _with_roles(500, RUN_MANAGED)
    synthetic_seed: int = _with_roles(0, RUN_MANAGED)
    num_items: int = _with_roles(0, RUN_MANAGED)  # catalogue size of a deployed run (0 in simulation: the dataset decides)
    # Federation.
    num_server_rounds: int = _with_roles(10, UNHASHED, RESUME_OVERRIDABLE)
    clients_per_round: int = 50
    strategy: str = "fedavg"
    server_lr: float = 0.0  # FedAdam/FedYogi eta, FedAvgM server lr; 0 = the strategy's Flower default
    server_momentum: float = 0.9  # FedAvgM
    # FedAdam/FedYogi tau, the adaptivity floor added to sqrt(v) (Adam's epsilon); 0 = Flower's default 1e-3.
    server_tau: float = 0.0
    proximal_mu: float = 0.01  # FedProx
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut off each tail, in [0, 0.5)
    num_malicious_nodes: int = 0  # Krum: how many of a round's replies may be Byzantine
    round_timeout: float = 600.0
    min_replies: int = 1  # fewer valid replies than this: the round completes without aggregation
    # Update checks: L2 norm of (reply weights - global weights sent) above this is rejected; 0 = off.
    max_update_norm: float = 0.0
    # Simulated faults (simulation only): this fraction of each round's sampled devices
    # fails (fault-mode "fail") or stalls past round-timeout ("timeout").
    fault_fraction: float = 0.0
    fault_mode: str = "fail"
    # Simulation: each virtual node holds this many consecutive users of the dataset and
    # trains each sampled one as the device it stands for (docs/simulations.md, "Shards").
    users_per_node: int = 1
    # Research only: seeds every DP noise draw and the layer-2 sampling (0 = OS entropy,
    # the only setting under which the privacy figures hold; the reports say so otherwise).
    research_noise_seed: int = 0
    # Local training on the device.
    local_epochs: int = 1
    local_lr: float = 1e-3
    local_optimizer: str = "adam"
    batch_size: int = 8  # expected batch size under Poisson sampling
    # With DP-SGD, the window count the sampling is sized for, in place of each device's
    # own (which a rate, step count or denominator derived from it would reveal):
    # q = 1 / ceil(dp-windows / batch-size), as many steps an epoch, the noised sum divided
    # by int(dp-windows * q). 1 (the default): one full-batch step an epoch at q = 1.
    dp_windows: int = 1
    # Layer-1 DP (on device). noise_multiplier = 0 turns DP off (no clipping, no noise, epsilon = inf).
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 8.0
    # Layer-2 DP (on the server, server/user_privacy.py): user-noise-multiplier > 0 turns
    # on DP-FedAvg -- Poisson sampling of devices at rate clients-per-round / nodes, each
    # update clipped to user-clip-norm, Gaussian noise on the aggregate -- and the run
    # stops before a round that would take user-level epsilon past user-epsilon-budget
    # at user-delta (0 = 1 / number of nodes registered at the first round).
    user_noise_multiplier: float = 0.0
    user_clip_norm: float = 1.0  # the clip norm, or its start under adaptive clipping
    # Adaptive clipping (Andrew et al. 2021; server/adaptive_clipping.py): > 0 moves the clip
    # norm each round toward this quantile of the users' update norms, from a noised count
    # that the accountant's noise multiplier already covers; 0 = the fixed user-clip-norm.
    user_clip_quantile: float = 0.0
    user_clip_lr: float = 0.2  # the geometric step of the clip norm (the paper's and Flower's default)
    user_clip_count_stddev: float = 0.0  # noise std on the count; 0 = expected users per round / 20
    user_delta: float = 0.0  # 0 = N^-1.1, N the users at the first round
    user_epsilon_budget: float = 8.0
    # > 0 turns layer 2 on with sigma calibrated so that num-server-rounds releases spend
    # this epsilon (user-noise-multiplier then stays 0); the budget still stops the run.
    user_target_epsilon: float = 0.0
    user_accountant: str = "prv"  # Opacus's PRV accountant (tighter) or "rdp"
    # FedAdam under layer 2 (DP-AdamBC, server/noise_aware_adam.py): > 0 subtracts the known
    # noise variance from Adam's second moment, floored at this multiple of it; 0 = off.
    server_noise_correction: float = 0.0
    # The private popularity prior (issue 12, lever 5; server/popularity_prior.py): before
    # round 1 the sampled users' per-user bounded item counts are released with the same
    # Gaussian mechanism as a round (one more step in the accountant, which calibrates
    # sigma for num-server-rounds + 1 releases); the evaluator blends them into the model's
    # per-item bias with the weight validation prefers (0 = the model alone). Simulation only.
    popularity_prior: bool = False
    # Secure aggregation (docs/privacy.md, "Secure aggregation"): "secagg+" runs Flower's
    # SecAgg+ each round; each device clips its update to user-clip-norm and, with layer 2,
    # adds its share of the noise. secagg-num-shares: 0 = every sampled node shares its keys
    # with every other (SecAgg), else with this many neighbours (SecAgg+, odd, > 2).
    # secagg-reconstruction-threshold: the fraction of shares needed to rebuild a key, which
    # sets the fewest surviving devices a round accepts (and the noise each one adds).
    aggregation: str = "plain"
    secagg_num_shares: int = 0
    secagg_reconstruction_threshold: float = 0.67
    # Model. item-vectors "attributes" builds item vectors from the public catalogue
    # attributes in item-attributes (common/item_attributes.py); tie-item-vectors makes the
    # head reuse the item table (common/model.py).
    item_vectors: str = "free"
    tie_item_vectors: bool = False
    item_attributes: str = ""
    max_len: int = 200
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    # Devices add their training loss to train replies and their held-out item's HR@10 /
    # NDCG@10 to evaluate replies: noiseless functions of their data, outside every DP
    # guarantee (docs/privacy.md). A real device adds them only if its privacy policy allows.
    share_metrics: bool = False
    # Evaluation and bookkeeping.
    eval_every: int = 5
    seed: int = 0
    run_dir: str = _with_roles("", RUN_MANAGED, UNHASHED)  # where the ServerApp writes checkpoints and metrics (the runner sets it)

    def __post_init__(self) -> None:
        problems = []
        # NaN fails no `<` check and would pass every range test below (noise-multiplier = nan
        # would even turn DP off unnoticed), so every float must be finite first.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{_key(f.name)} must be a finite number, got {value!r}")
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                problems.append(f"{_key(f.name)} is out of range (|value| > {MAX_INT})")
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))
        positive_ints = ("synthetic_users", "synthetic_items", "num_server_rounds", "clients_per_round", "local_epochs", "batch_size", "dp_windows", "eval_every", "users_per_node")
        for name in positive_ints:
            if getattr(self, name) < 1:
                problems.append(f"{_key(name)} must be at least 1")
        if self.server_lr < 0:
            problems.append("server-lr must be >= 0 (0 = the strategy's own default)")
        if self.server_tau < 0:
            problems.append("server-tau must be >= 0 (0 = Flower's default)")
        for name in ("local_lr", "max_grad_norm", "round_timeout", "epsilon_budget"):
            if not getattr(self, name) > 0:
                problems.append(f"{_key(name)} must be positive")
        if self.noise_multiplier < 0:
            problems.append("noise-multiplier must be >= 0 (0 turns DP off)")
        if not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        problems += self._user_level_problems()
        if not 0 <= self.server_momentum < 1:
            problems.append("server-momentum must be in [0, 1)")
        if self.proximal_mu < 0:
            problems.append("proximal-mu must be >= 0")
        if not 0 <= self.trim_beta < 0.5:
            problems.append("trim-beta must be in [0, 0.5)")
        if self.num_malicious_nodes < 0:
            problems.append("num-malicious-nodes must be >= 0")
        if self.min_replies < 1:
            problems.append("min-replies must be at least 1")
        if not (self.max_update_norm >= 0 and self.max_update_norm < float("inf")):
            problems.append("max-update-norm must be a finite number >= 0 (0 turns the bound off)")
        if not 0 <= self.fault_fraction <= 1:
            problems.append("fault-fraction must be in [0, 1]")
        if self.fault_mode not in FAULT_MODES:
            problems.append(f"fault-mode must be one of {', '.join(FAULT_MODES)}")
        if self.item_vectors not in ITEM_VECTORS:
            problems.append(f"item-vectors must be one of {', '.join(ITEM_VECTORS)}")
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            problems.append(f"local-optimizer must be one of {', '.join(LOCAL_OPTIMIZERS)}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.research_noise_seed < 0:
            problems.append("research-noise-seed must be >= 0 (0 = noise from OS entropy)")
        if self.users_per_node > 1 and self.strategy in ROBUST_STRATEGIES:
            problems.append(f"strategy {self.strategy} ranks individual updates; it needs users-per-node = 1 (a shard replies with its users' combined update)")
        if self.deployed and self.users_per_node != 1:
            problems.append(f'users-per-node is a simulation option; a run on dataset "{DEPLOYED}" has one user per device')
        if self.deployed and self.fault_fraction > 0:
            problems.append(f'fault-fraction is a simulation option; a run on dataset "{DEPLOYED}" must leave it at 0')
        if self.deployed and self.num_items < 1:
            problems.append(f'dataset "{DEPLOYED}" needs num-items (the catalogue size) of at least 1')
        if not self.deployed and self.num_items != 0:
            problems.append(f'num-items is only for dataset "{DEPLOYED}"; a simulation takes it from its dataset')
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))
        if self.item_vectors == "attributes" and not self.item_attributes:
            raise ValueError('invalid run config: item-vectors "attributes" needs item-attributes (the catalogue\'s attribute file)')
        if self.item_vectors != "attributes" and self.item_attributes:
            raise ValueError('invalid run config: item-attributes is only read with item-vectors = "attributes"')
        if self.deployed and self.item_vectors == "attributes":
            raise ValueError(f'invalid run config: item-vectors "attributes" is a simulation option for now; devices of a "{DEPLOYED}" run hold no attribute file')
        self._model_shape(num_items=1, item_attributes=((), (1,)) if self.item_vectors == "attributes" else ())  # raises on a bad model shape
        if not self.deployed:
            self.dataset_spec()  # raises on a bad dataset description

    def _user_level_problems(self) -> list[str]:
        problems = []
        if self.user_noise_multiplier < 0:
            problems.append("user-noise-multiplier must be >= 0 (0 turns user-level DP off)")
        for name in ("user_clip_norm", "user_epsilon_budget"):
            if not getattr(self, name) > 0:
                problems.append(f"{_key(name)} must be positive")
        if not 0 <= self.user_clip_quantile < 1:
            problems.append("user-clip-quantile must be in [0, 1) (0 = the fixed user-clip-norm)")
        if not self.user_clip_lr > 0:
            problems.append("user-clip-lr must be positive")
        if self.user_clip_count_stddev < 0:
            problems.append("user-clip-count-stddev must be >= 0 (0 = expected users per round / 20)")
        if self.user_clip_quantile > 0 and not self.user_private:
            problems.append("user-clip-quantile adapts layer 2's clip norm: it needs user-level DP (user-target-epsilon or user-noise-multiplier)")
        if not 0 <= self.user_delta < 1:
            problems.append("user-delta must be in [0, 1) (0 = N^-1.1, N the users)")
        if self.user_target_epsilon < 0:
            problems.append("user-target-epsilon must be >= 0 (0 = use user-noise-multiplier)")
        if self.user_target_epsilon > 0 and self.user_noise_multiplier > 0:
            problems.append("give user-noise-multiplier or user-target-epsilon, not both (the target calibrates the noise)")
        if self.user_target_epsilon > self.user_epsilon_budget:
            problems.append(f"user-target-epsilon {self.user_target_epsilon:g} exceeds user-epsilon-budget {self.user_epsilon_budget:g}")
        if self.user_accountant not in USER_ACCOUNTANTS:
            problems.append(f"user-accountant must be one of {', '.join(USER_ACCOUNTANTS)}")
        if self.server_noise_correction < 0:
            problems.append("server-noise-correction must be >= 0 (0 = off)")
        if self.server_noise_correction > 0 and (self.strategy != "fedadam" or not self.user_private):
            problems.append("server-noise-correction corrects FedAdam for layer 2's noise: it needs strategy fedadam and user-level DP")
        problems += self._secure_aggregation_problems()
        if self.popularity_prior and not (self.user_private and self.aggregation == "plain" and not self.deployed):
            problems.append(
                f'popularity-prior releases counts with layer 2\'s mechanism and picks its weight on the server\'s validation ranks: '
                f'it needs user-level DP (user-target-epsilon or user-noise-multiplier), aggregation "plain" and a simulation (not dataset "{DEPLOYED}")'
            )
        if self.user_private:
            # DP-FedAvg bounds one user's influence on a mean; a median or Krum's pick has no
            # such bound, and a round skipped for too few replies would leak why it was skipped.
            if self.strategy in ROBUST_STRATEGIES:
                problems.append(f"user-level DP (user-noise-multiplier > 0) needs a mean aggregate; strategy {self.strategy} is not one (use fedavg, fedavgm, fedadam, fedyogi or fedprox)")
            if self.min_replies > 1:
                problems.append("min-replies must stay 1 with user-level DP: every round is released (noised) whatever number of devices replied")
        return problems

    def _secure_aggregation_problems(self) -> list[str]:
        if self.aggregation not in AGGREGATIONS:
            return [f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"]
        problems = []
        if self.secagg_num_shares != 0 and (self.secagg_num_shares < 3 or self.secagg_num_shares % 2 == 0):
            problems.append("secagg-num-shares must be 0 (every sampled node) or an odd number above 2")
        if not 0 < self.secagg_reconstruction_threshold <= 1:
            problems.append("secagg-reconstruction-threshold must be in (0, 1] (a fraction of the shares)")
        if self.secure_aggregation:
            if self.strategy in ROBUST_STRATEGIES:
                problems.append(f"aggregation secagg+ reveals only the sum; strategy {self.strategy} needs the updates one by one")
            if self.min_replies > 1:
                problems.append("min-replies must stay 1 with aggregation secagg+: the protocol's threshold decides whether a round completes")
            if self.max_update_norm > 0:
                problems.append("max-update-norm checks single updates, which aggregation secagg+ hides from the server; leave it 0")
            if self.user_clip_quantile > 0:
                problems.append("user-clip-quantile adapts the clip norm from per-node counts, which aggregation secagg+ does not carry; leave it 0")
        return problems

    @property
    def secure_aggregation(self) -> bool:
        """Whether the server learns only the sum of the updates (Flower's SecAgg+)."""
        return self.aggregation == "secagg+"

    @property
    def clips_user_updates(self) -> bool:
        """Whether every user's update is clipped to user-clip-norm on the device (layer 2, or secure aggregation's bounded range)."""
        return self.user_private or self.secure_aggregation

    @property
    def user_private(self) -> bool:
        """Whether the server runs DP-FedAvg (layer 2) on top of the devices' DP-SGD."""
        return self.user_noise_multiplier > 0 or self.user_target_epsilon > 0

    @property
    def noise_seeded(self) -> bool:
        """Whether DP noise is reproducible (research only: its privacy figures do not hold)."""
        return self.research_noise_seed > 0

    @property
    def deployed(self) -> bool:
        """Whether real devices hold the data (the server has none to load or evaluate)."""
        return self.dataset == DEPLOYED

    @property
    def private(self) -> bool:
        """Whether devices train with DP-SGD."""
        return self.noise_multiplier > 0

    def dataset_spec(self) -> DatasetSpec:
        """The dataset every partition is cut from (a simulation's; a deployed run has none)."""
        if self.deployed:
            raise ValueError(f'a run on dataset "{DEPLOYED}" has no dataset to load: its devices hold the data')
        try:
            synthetic = SyntheticConfig(num_users=self.synthetic_users, num_items=self.synthetic_items, seed=self.synthetic_seed)
        except ValueError as err:
            # SyntheticConfig names its own fields; these three run-config keys are what set them.
            raise ValueError(f"invalid synthetic-users / synthetic-items / synthetic-seed: {err}") from err
        try:
            return DatasetSpec(kind=self.dataset, path=self.data_path or None, synthetic=synthetic)
        except ValueError as err:
            raise ValueError(f"invalid dataset / data-path: {err}") from err

    def model_config(self, num_items: int, item_ids: Sequence[str] | None = None) -> ModelConfig:
        """The model for a catalogue of `num_items` items (`item_ids`: their ids, needed for attribute vectors)."""
        rows: tuple[tuple[int, ...], ...] = ()
        if self.item_vectors == "attributes":
            if item_ids is None or len(item_ids) != num_items:
                raise ValueError("attribute item vectors need the ids of the catalogue's items")
            rows = item_attribute_rows(self.item_attributes, item_ids)
        return self._model_shape(num_items, rows)

    def _model_shape(self, num_items: int, item_attributes: tuple[tuple[int, ...], ...]) -> ModelConfig:
        return ModelConfig(
            num_items=num_items, max_len=self.max_len, dim=self.dim, num_blocks=self.num_blocks,
            num_heads=self.num_heads, dropout=self.dropout, item_vectors=self.item_vectors,
            tie_item_vectors=self.tie_item_vectors, item_attributes=item_attributes,
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse Flower's run config; unknown keys and wrong types are errors that name the key."""
        by_key = {_key(f.name): f for f in fields(cls)}
        unknown = sorted((str(k) for k in set(run_config) - set(by_key)), key=str)  # keys of any type, never a TypeError
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(by_key)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = by_key[key]
            expected = type(getattr(cls, field.name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                if abs(value) > MAX_INT:  # beyond this a float no longer holds the integer given
                    raise ValueError(f"run-config key {key!r} is out of range (|value| > {MAX_INT})")
                value = float(value)
            if type(value) is not expected:
                raise ValueError(f"run-config key {key!r} must be {expected.__name__}, got {value!r}")
            values[field.name] = value
        return cls(**values)

    def to_flower(self) -> UserConfig:
        """The kebab-case mapping Flower carries (inverse of `from_flower`)."""
        return {_key(name): value for name, value in asdict(self).items()}


def keys_with(role: str) -> tuple[str, ...]:
    """The run-config keys whose field declares `role` (RUN_MANAGED, UNHASHED, RESUME_OVERRIDABLE), in field order."""
    return tuple(_key(f.name) for f in fields(RunConfig) if role in f.metadata.get("roles", ()))


def _key(name: str) -> str:
    return name.replace("_", "-")
