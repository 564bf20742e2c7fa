"""Typed run configuration, loaded from a scenario YAML file and validated before any work starts.

Every problem in a scenario (unknown key, wrong type, impossible value) is collected and reported at
once, each naming its dotted key, as one :class:`~fedq.errors.ConfigError`. ``--set key=value``
overrides are applied to the raw mapping first, so they are validated the same way.

A key the chosen ``mode`` does not use (the ``split`` section in federated mode; ``compression``,
the FedProx / FedAdam parameters and ``train.local_epochs`` in split mode) is an error that says
so, rather than being silently ignored; the saved ``config.json`` holds only what the mode uses.
The round schedule of both modes is the ``rounds`` section; a key that moved there from ``fed``
is an error naming its new key (:data:`MOVED_FROM_FED`).
Defaults that differ by mode (the optimizer) are resolved here and saved resolved. What each mode
checks is data, one :class:`ModeRules` per mode in :data:`MODE_RULES`: the built-in modes' rules
are here, and a mode registered in :mod:`fedq.modes` brings its own (``register_mode_rules``).

This module imports nothing from fedq but :mod:`fedq.errors`: names that live in registries (data
sets, models) and problems that need the data are checked by :mod:`fedq.runtime.preflight` before
any host starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedq.errors import ConfigError

Problems = list[str]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Data set and how it is split across clients."""

    name: str = "digits"  # digits | mnist1d | rotten_tomatoes | npz:PATH | csv:PATH | py:mod:fn
    partition: Literal["iid", "dirichlet", "classes"] = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    max_train: int | None = None
    max_test: int | None = None
    num_samples: int | None = None  # generated data sets (mnist1d): rows to make, train + test
    # each client's features standardized with its own rows' mean/std, the server's evaluation
    # data with its own (fedq.data.scaling); float features only
    standardize: bool = False
    # each client keeps this fraction of its own rows (seeded) out of training and evaluates the
    # model each evaluation round starts from on them (per-site and pooled metrics; 0: off)
    site_holdout: float = 0.0

    def check(self) -> Problems:
        p = []
        if not 0 <= self.site_holdout <= 0.5:
            p.append(f"data.site_holdout: must be in [0, 0.5], got {self.site_holdout}")
        if self.num_samples is not None and self.num_samples < 1:
            p.append(f"data.num_samples: must be >= 1 or null, got {self.num_samples}")
        if self.alpha <= 0:
            p.append(f"data.alpha: must be > 0, got {self.alpha}")
        if self.classes_per_client < 1:
            p.append(f"data.classes_per_client: must be >= 1, got {self.classes_per_client}")
        for k in ("max_train", "max_test"):
            v = getattr(self, k)
            if v is not None and v < 1:
                p.append(f"data.{k}: must be >= 1 or null, got {v}")
        return p


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """``model.lora``: PEFT's ``LoraConfig`` options under PEFT's own names. Null keeps the
    model's default (``r``: ``model.lora_r``; ``lora_alpha``: 16 for encoders, 2r for causal LMs;
    ``target_modules``: PEFT's default for the architecture)."""

    r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"

    def check(self) -> Problems:
        p = []
        if self.r is not None and self.r < 1:
            p.append(f"model.lora.r: must be >= 1, got {self.r}")
        if self.lora_alpha is not None and self.lora_alpha < 1:
            p.append(f"model.lora.lora_alpha: must be >= 1, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"model.lora.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.target_modules is not None and not self.target_modules:
            p.append("model.lora.target_modules: name at least one module, or null for the default")
        return p

    def options(self) -> dict[str, Any]:
        """The options set (what :func:`fedq.models.hf.lora_config` gets)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "mlp"  # mlp | cnn | minilm_lora | tiny_bert_lora | smollm2_instruct | hf:PATH
    hidden: int = 64
    lora_r: int = 8
    max_length: int = 64
    # hf: checkpoints: "auto" takes the model's own task (a ...ForCausalLM is a causal LM)
    task: Literal["auto", "classification", "causal_lm"] = "auto"
    lora: LoraOptions = field(default_factory=LoraOptions)
    # causal LMs: greedy answers to these prompts (default: the first 3 evaluation records) are
    # written to generations.jsonl at each evaluation; an empty list writes none
    sample_prompts: tuple[str, ...] | None = None
    sample_tokens: int = 32
    # SHA-256 of a Hugging Face base's config and weight files (fedq.models.hf.fingerprint):
    # the server fills it in; every client checks its own copy against it before any round
    base_sha256: str | None = None
    # causal LMs in federated mode: the frozen linear weights held packed at this many bits (one
    # scale and offset per base_group_size values), decoded per layer call (fedq.models.lowbit)
    base_bits: int | None = None
    base_group_size: int = 64
    # instead of base_bits: the packed linear weights fit this many MiB (payload and scales),
    # each matrix's width and group size chosen for the least error (fedq.models.lowbit.allocate)
    base_budget_mb: float | None = None
    # causal LMs in federated mode: keep only each decoder layer's input for the backward pass
    # and recompute the rest (transformers' gradient checkpointing): less memory, more time
    gradient_checkpointing: bool = False
    # with a packed base: LoRA starts as the rank-r part of each adapted matrix that packing
    # loses (LQ-LoRA's decomposition W ~ Q + BA, fedq.models.lowbit.lowrank_init), not at zero
    base_lowrank_init: bool = False

    def build_options(self) -> dict[str, Any]:
        """What every model builder gets (``fedq.models.build_model``); ``model.lora.r``, when
        set, wins over ``model.lora_r``."""
        return {
            "hidden": self.hidden,
            "lora_r": self.lora.r or self.lora_r,
            "max_length": self.max_length,
            "lora": self.lora.options(),
            "task": self.task,
            "base_bits": self.base_bits,
            "base_group_size": self.base_group_size,
            "base_budget_mb": self.base_budget_mb,
            "gradient_checkpointing": self.gradient_checkpointing,
            "base_lowrank_init": self.base_lowrank_init,
        }

    def check(self) -> Problems:
        p = []
        if self.sample_tokens < 1:
            p.append(f"model.sample_tokens: must be >= 1, got {self.sample_tokens}")
        if self.hidden < 1:
            p.append(f"model.hidden: must be >= 1, got {self.hidden}")
        if self.lora_r < 1:
            p.append(f"model.lora_r: must be >= 1, got {self.lora_r}")
        if self.max_length < 2:
            p.append(f"model.max_length: must be >= 2, got {self.max_length}")
        if self.base_bits is not None and not 2 <= self.base_bits <= 8:
            p.append(f"model.base_bits: must be in 2..8 or null, got {self.base_bits}")
        if self.base_group_size < 1:
            p.append(f"model.base_group_size: must be >= 1, got {self.base_group_size}")
        if self.base_budget_mb is not None:
            if self.base_bits is not None:
                p.append("model.base_budget_mb: set it or model.base_bits, not both")
            if not self.base_budget_mb > 0:
                p.append(f"model.base_budget_mb: must be > 0, got {self.base_budget_mb}")
        if self.base_lowrank_init and not self.packed_base:
            p.append(
                "model.base_lowrank_init: starts LoRA from what packing the base loses; set "
                "model.base_bits or model.base_budget_mb too"
            )
        return p

    @property
    def packed_base(self) -> bool:
        """Whether the frozen base is held packed (``base_bits`` or ``base_budget_mb``)."""
        return self.base_bits is not None or self.base_budget_mb is not None

    def packing(self) -> dict[str, Any] | None:
        """How the frozen base is packed (``bits``, ``group_size``, ``budget_mb``), or None."""
        if not self.packed_base:
            return None
        return {
            "bits": self.base_bits,
            "group_size": self.base_group_size,
            "budget_mb": self.base_budget_mb,
        }


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training on each client (in split mode: the optimizer of both halves' LoRA)."""

    local_epochs: int = 1  # federated only (split mode runs split.local_steps per round)
    batch_size: int = 32
    lr: float = 0.1
    optimizer: Literal["sgd", "adam", "adamw"] | None = None  # None: the mode's default
    momentum: float = 0.0
    weight_decay: float | None = None  # None: the mode's default

    def check(self) -> Problems:
        p = []
        if self.local_epochs < 1:
            p.append(f"train.local_epochs: must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            p.append(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            p.append(f"train.lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            p.append(f"train.momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            p.append(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        return p


@dataclass(frozen=True, kw_only=True)
class RoundsConfig:
    """``rounds:``: the round schedule, the same in both modes: ``count`` rounds over a roster of
    ``num_clients``, ``clients_per_round`` selected in each."""

    count: int = 10
    num_clients: int = 10
    clients_per_round: int = 10
    # a round starts once this many registered clients are available, and is discarded (nothing
    # applied) when fewer updates than this arrive
    min_clients: int = 1
    eval_every: int = 1
    timeout_s: float = 600.0  # a selected client without an update by then is dropped

    def check(self) -> Problems:
        p = []
        for k in ("count", "num_clients", "clients_per_round", "min_clients", "eval_every"):
            if getattr(self, k) < 1:
                p.append(f"rounds.{k}: must be >= 1, got {getattr(self, k)}")
        if self.clients_per_round > self.num_clients:
            p.append(
                f"rounds.clients_per_round: {self.clients_per_round} exceeds "
                f"rounds.num_clients={self.num_clients}"
            )
        if self.min_clients > self.clients_per_round:
            p.append(
                f"rounds.min_clients: {self.min_clients} exceeds "
                f"rounds.clients_per_round={self.clients_per_round}"
            )
        if not 0 < self.timeout_s < float("inf"):
            p.append(f"rounds.timeout_s: must be > 0 and finite, got {self.timeout_s}")
        return p


@dataclass(frozen=True, kw_only=True)
class FedConfig:
    """``fed:``: the federated server optimizer (the schedule is in ``rounds:``)."""

    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99  # fedadam
    tau: float = 1e-3  # fedadam

    def check(self) -> Problems:
        p = []
        if self.proximal_mu < 0:
            p.append(f"fed.proximal_mu: must be >= 0, got {self.proximal_mu}")
        if self.server_lr <= 0:
            p.append(f"fed.server_lr: must be > 0, got {self.server_lr}")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                p.append(f"fed.{k}: must be in [0, 1), got {getattr(self, k)}")
        if self.tau <= 0:
            p.append(f"fed.tau: must be > 0, got {self.tau}")
        return p


#: Keys of ``fed:`` that moved to ``rounds:`` (name in ``fed`` -> name in ``rounds``): setting one
#: is an error naming its new key; a run folder's saved ``config.json`` is read with them moved.
MOVED_FROM_FED: dict[str, str] = {
    "rounds": "count",
    "num_clients": "num_clients",
    "clients_per_round": "clients_per_round",
    "min_clients": "min_clients",
    "eval_every": "eval_every",
    "round_timeout_s": "timeout_s",
}


def _moved_problems(raw: dict[str, Any]) -> tuple[dict[str, Any], Problems]:
    """``raw`` without the keys that moved out of ``fed``, and one problem per such key."""
    fed = raw.get("fed")
    if not isinstance(fed, dict):
        return raw, []
    moved = [k for k in fed if k in MOVED_FROM_FED]
    problems = [f"fed.{k}: moved to rounds.{MOVED_FROM_FED[k]}" for k in moved]
    return {**raw, "fed": {k: v for k, v in fed.items() if k not in moved}}, problems


def migrate_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` saved before the ``rounds:`` section, with its schedule moved there (a key
    already in ``rounds`` wins, the old one is then left for the error)."""
    fed, rounds = raw.get("fed"), raw.get("rounds", {})
    if not isinstance(fed, dict) or not isinstance(rounds, dict):
        return raw
    fed, rounds = dict(fed), dict(rounds)
    for old, new in MOVED_FROM_FED.items():
        if old in fed and new not in rounds:
            rounds[new] = fed.pop(old)
    return {**raw, "fed": fed, "rounds": rounds} if rounds else raw


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """Compression of one direction (uplink: client updates; downlink: global parameters)."""

    policy: Literal["none", "fixed", "cosine", "client_entropy", "budget"] = "fixed"
    bits: int = 8  # fixed
    b_min: int = 8  # cosine / client_entropy / budget
    b_max: int = 32  # cosine / client_entropy / budget (budget caps at 8)
    budget_bytes: int = 0  # budget: bytes per update (per client per round)
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = 128
    symmetric: bool = False
    stochastic: bool = False
    error_feedback: bool = False
    scale_dtype: Literal["float16", "float32"] = "float16"

    def check(self, prefix: str) -> Problems:
        p = []
        if not 1 <= self.bits <= 32:
            p.append(f"{prefix}.bits: must be in 1..32, got {self.bits}")
        if not 1 <= self.b_min <= self.b_max <= 32:
            p.append(
                f"{prefix}.b_min/b_max: need 1 <= b_min <= b_max <= 32, "
                f"got b_min={self.b_min}, b_max={self.b_max}"
            )
        if self.policy == "budget" and self.budget_bytes <= 0:
            p.append(f"{prefix}.budget_bytes: policy 'budget' needs a positive byte budget")
        if self.group_size < 1:
            p.append(f"{prefix}.group_size: must be >= 1, got {self.group_size}")
        return p


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    uplink: LinkConfig = field(default_factory=LinkConfig)
    downlink: LinkConfig = field(default_factory=lambda: LinkConfig(policy="none"))

    def check(self) -> Problems:
        return self.uplink.check("compression.uplink") + self.downlink.check("compression.downlink")


#: ``privacy.mechanism`` names each mode offers: the keys of its registry of mechanism classes
#: (``fedq.fed.privacy.MECHANISMS``, ``fedq.split.privacy.LEDGERS``; a test keeps them equal),
#: named here because ``config`` imports nothing above it (:class:`ModeRules`).
FED_PRIVACY = ("none", "dpsgd", "central", "laplace")
SPLIT_PRIVACY = ("none", "activations")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Differential privacy (see README "Privacy" for the guarantee each mechanism gives).

    - ``dpsgd``: local DP-SGD on every client (Opacus; per-example clipping + Gaussian noise),
      record-level DP for each client's data, one RDP/PRV accountant per client.
    - ``central``: client-level DP-FedAvg: each update is L2-clipped (by the client before
      quantization, and again by the server after decoding), the unweighted mean gets Gaussian
      noise, accounted with client sampling rate K/N, one step per round.
    - ``laplace``: Laplace noise on each client update before quantization with a pure-epsilon
      ledger per client (Ardic & Genc). ``laplace_calibration: sound`` L1-clips the update to
      ``clip_norm`` (sensitivity 2C); ``paper`` reproduces the paper's heuristic calibration.
    - ``activations`` (``mode: split`` only): each example's cut activation is L2-clipped to
      ``clip_norm`` and Gaussian-noised before quantization; see :mod:`fedq.split.privacy`.
    """

    mechanism: Literal["none", "dpsgd", "central", "laplace", "activations"] = "none"
    target_epsilon: float | None = None  # stop before exceeding; null = account only
    delta: float = 1e-5
    noise_multiplier: float | None = None  # dpsgd / central; null = planned from target_epsilon
    clip_norm: float = 1.0  # L2 (dpsgd per example, central per update) or L1 (laplace)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    laplace_calibration: Literal["sound", "paper"] = "sound"

    def check(self) -> Problems:
        p = []
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            p.append(f"privacy.target_epsilon: must be > 0 or null, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            p.append(f"privacy.delta: must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            p.append(f"privacy.noise_multiplier: must be > 0 or null, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            p.append(f"privacy.clip_norm: must be > 0, got {self.clip_norm}")
        planned = ("dpsgd", "central", "activations")
        needs_plan = self.mechanism in planned and self.noise_multiplier is None
        if needs_plan and self.target_epsilon is None:
            p.append(
                f"privacy.noise_multiplier: mechanism {self.mechanism!r} needs a noise_multiplier"
                " or a target_epsilon to plan one from"
            )
        if self.mechanism == "laplace" and self.target_epsilon is None:
            p.append("privacy.target_epsilon: mechanism 'laplace' calibrates its noise to a target")
        return p


@dataclass(frozen=True, kw_only=True)
class DefenceConfig:
    """``defence:``: how the server treats client updates it cannot trust (federated mode).

    Every decoded update is checked against bounds (finite values; per tensor, max|delta| <=
    ``max_abs_ratio`` * (max|w| + 1) of the global tensor w, and the whole update's L2 norm <=
    ``max_update_norm``, each when set) and refused with the reason otherwise; a client refused in
    ``max_bad_updates`` rounds is excluded from the run (0: never). Accepted updates are clipped to
    ``clip_norm`` (L2, when set) and combined by ``aggregator`` in roster order: the weighted
    ``mean`` (weights: the examples a client declared, capped at ``max_examples_per_client``, or
    ``equal``), the coordinate-wise ``median``, the ``trimmed_mean`` (``trim_fraction`` of the
    updates dropped at each end, per coordinate) or (multi-)``krum`` (``krum_f`` assumed attackers,
    the ``krum_m`` best-scored updates averaged). The new global model must be finite, within the
    same magnitude rule (when set) and carried by the downlink codec before it is applied
    (docs/algorithms.md, "Defences").
    """

    aggregator: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"
    weights: Literal["examples", "equal"] = "examples"  # mean: how updates are weighted
    max_examples_per_client: int | None = None  # cap on a client's weight (null: none)
    clip_norm: float | None = None  # L2 clip of each update before combining (null: off)
    trim_fraction: float = 0.1  # trimmed_mean: fraction dropped at each end
    krum_f: int = 1  # krum: assumed attackers per round
    krum_m: int = 1  # krum: updates averaged (1 = Krum, > 1 = multi-Krum)
    max_update_norm: float | None = None  # refuse an update with a larger L2 norm (null: off)
    # refuse max|delta| > ratio * (max|w| + 1), per tensor (null: off). Loose by default: honest
    # clients on unscaled features change entries by up to 2.6e4 x (max|w| + 1), those of the
    # shipped scenarios by at most 1.4 (docs/algorithms.md "Defences"): set 100 for those.
    max_abs_ratio: float | None = 1e6
    max_bad_updates: int = 3  # rounds with a refused update before exclusion (0: never)

    def check(self) -> Problems:
        p = []
        if self.max_examples_per_client is not None and self.max_examples_per_client < 1:
            p.append(
                "defence.max_examples_per_client: must be >= 1 or null, got "
                f"{self.max_examples_per_client}"
            )
        for k in ("clip_norm", "max_update_norm"):
            v = getattr(self, k)
            if v is not None and not 0 < v < float("inf"):
                p.append(f"defence.{k}: must be > 0 and finite or null, got {v}")
        if not 0 <= self.trim_fraction < 0.5:
            p.append(f"defence.trim_fraction: must be in [0, 0.5), got {self.trim_fraction}")
        if self.krum_f < 0:
            p.append(f"defence.krum_f: must be >= 0, got {self.krum_f}")
        if self.krum_m < 1:
            p.append(f"defence.krum_m: must be >= 1, got {self.krum_m}")
        if self.max_abs_ratio is not None and not 0 < self.max_abs_ratio < float("inf"):
            p.append(
                f"defence.max_abs_ratio: must be > 0 and finite or null, got {self.max_abs_ratio}"
            )
        if self.max_bad_updates < 0:
            p.append(
                f"defence.max_bad_updates: must be >= 0 (0 = never exclude), got "
                f"{self.max_bad_updates}"
            )
        return p


#: Largest chunk of a streamed message: every frame (chunk + framing) must stay under gRPC's
#: default 4 MiB message cap (the transport enforces the same bound).
MAX_CHUNK_BYTES = 3 << 20


#: Where hosts may be placed on a Ray cluster: ``spread`` (across as many nodes as possible) or
#: ``pack`` (onto as few as possible); a Ray placement group of that strategy reserves them.
Placement = Literal["spread", "pack"]


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """One entry of ``runtime.sites``: ``clients`` logical clients (the next ones in roster order)
    on ``workers`` worker hosts, placed on Ray nodes that have the custom resource ``resource``
    (any node when null), each worker reading ``data`` (a data source, as ``fedq join --data``
    takes it) on the node it runs on; without ``data`` the clients take their shares of
    ``data.name``."""

    clients: int = 0
    resource: str | None = None
    data: str | None = None
    workers: int = 1

    def check(self, prefix: str) -> Problems:
        p = []
        if self.clients < 1:
            p.append(f"{prefix}.clients: must be >= 1, got {self.clients}")
        if not 1 <= self.workers <= max(self.clients, 1):
            p.append(
                f"{prefix}.workers: must be in 1..clients ({self.clients}), got {self.workers}"
            )
        if self.resource is not None and not self.resource.strip():
            p.append(f"{prefix}.resource: must be a Ray resource name or null, got ''")
        if self.data is not None and not self.data.strip():
            p.append(f"{prefix}.data: must be a data source or null, got ''")
        return p


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Where the run executes. ``workers: 0`` means one per core (of the Ray cluster when
    attached to one). ``device``: where the models train and the codecs compute, in both modes
    (``cuda`` needs a CUDA build of torch and a GPU; ``auto`` takes CUDA when torch sees one);
    packed tensors, the wire form, stay on the CPU and decode onto the device. ``placement`` ..
    ``sites`` say where the hosts go on a Ray cluster (README "Scaling out on a Ray cluster");
    ``tls``: ``auto`` encrypts the hosts' traffic when the server listens on a non-loopback
    address (an attached cluster), ``always`` on loopback too. ``upload_budget_mb``: the bytes
    of uploads the server reads at once; an upload beyond it is refused as busy and retried."""

    backend: Literal["ray", "inprocess"] = "ray"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    workers: int = 0
    ray_address: str | None = None
    object_store_mb: int = 256
    num_cpus: int | None = None
    threads_per_worker: int = 1
    chunk_bytes: int = 1 << 20
    placement: Placement = "spread"
    cpus_per_worker: float = 0.0
    gpus_per_worker: float | None = None  # null: a small share of a GPU with device cuda
    server_resource: str | None = None
    sites: tuple[SiteConfig, ...] = ()
    placement_timeout_s: float = 60.0
    tls: Literal["auto", "always"] = "auto"
    upload_budget_mb: int = 1024

    def check(self) -> Problems:
        p = []
        if self.upload_budget_mb < 1:
            p.append(f"runtime.upload_budget_mb: must be >= 1, got {self.upload_budget_mb}")
        if self.workers < 0:
            p.append(f"runtime.workers: must be >= 0 (0 = one per core), got {self.workers}")
        if self.object_store_mb < 64:
            p.append(f"runtime.object_store_mb: must be >= 64, got {self.object_store_mb}")
        if self.num_cpus is not None and self.num_cpus < 1:
            p.append(f"runtime.num_cpus: must be >= 1 or null, got {self.num_cpus}")
        if self.threads_per_worker < 1:
            p.append(f"runtime.threads_per_worker: must be >= 1, got {self.threads_per_worker}")
        if not 1024 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            p.append(f"runtime.chunk_bytes: must be in [1 KiB, 3 MiB], got {self.chunk_bytes}")
        if not 0 <= self.cpus_per_worker < float("inf"):
            p.append(f"runtime.cpus_per_worker: must be >= 0, got {self.cpus_per_worker}")
        gpus = self.gpus_per_worker
        if gpus is not None and not 0 <= gpus < float("inf"):
            p.append(f"runtime.gpus_per_worker: must be >= 0 or null, got {gpus}")
        if self.server_resource is not None and not self.server_resource.strip():
            p.append("runtime.server_resource: must be a Ray resource name or null, got ''")
        if not 0 < self.placement_timeout_s < float("inf"):
            p.append(f"runtime.placement_timeout_s: must be > 0, got {self.placement_timeout_s}")
        for i, site in enumerate(self.sites):
            p += site.check(f"runtime.sites[{i}]")
        if self.sites and self.workers:
            p.append(
                "runtime.workers: with runtime.sites each site says how many workers it "
                "has (runtime.sites[i].workers, default 1); leave runtime.workers at "
                "0"
            )
        if self.backend == "inprocess":
            p += [
                f"{key}: placement on Ray nodes needs runtime.backend 'ray'"
                for key in self.ray_placement_keys()
            ]
        return p

    def ray_placement_keys(self) -> list[str]:
        """The keys set here that only a Ray backend can honour."""
        keys = [
            k for k in ("cpus_per_worker", "gpus_per_worker", "server_resource") if getattr(self, k)
        ]
        keys += [f"sites[{i}].resource" for i, s in enumerate(self.sites) if s.resource]
        return [f"runtime.{k}" for k in keys]


#: Split-learning cut codecs (the registry in :mod:`fedq.adapt.cut` must hold exactly these).
CutCodecName = Literal["amaq", "fixed", "none", "aqsgd"]


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """``split:``: where the model is cut and how the cut is coded (``mode: split`` only).

    Rounds, clients and the evaluation cadence come from ``rounds``, the optimizer of the LoRA
    halves from ``train``. Only options a user chooses between are here, each with a measured reason
    (BENCHMARKS.md, "Split options"); the fixed choices behind them are in docs/algorithms.md §5.
    """

    cut: int = 3  # the client holds embeddings + blocks [0, cut); the server the rest
    all_boundaries: bool = False  # also code every block boundary inside each half (stress test)
    local_steps: int = 10  # split steps per selected client per round; client state FedAvg'd after
    tiny_layers: int = 4  # blocks of the tiny random test models (tiny_bert_lora, tiny_llama_lora)
    # codec of each direction: amaq (learned bits per channel), fixed (fixed_bits per channel),
    # none (fp32); activations only: aqsgd (each example's change since its last visit)
    act_codec: CutCodecName = "amaq"
    grad_codec: CutCodecName = "amaq"
    # fixed and aqsgd; a fractional width (e.g. 1.5) sends a fixed mix of the two widths around
    # it, spread over the channels: the fixed baseline at any average width
    fixed_bits: float = 4
    # block ranges: the least-error clip per channel (mse), or plain min-max (cheaper to encode)
    quant_range: Literal["minmax", "sigma", "mse"] = "mse"
    # activation rows (tokens) with RMS above this many times the median go as float16 (0 = off)
    act_outlier_ratio: float = 3.0
    # AMAQ: bits per channel in [b_min, b_max]; the mean moves from init_bits to target_bits over
    # the first warmup_fraction of all steps, then holds; gate_lr is the gates' step
    b_min: int = 2
    b_max: int = 8
    init_bits: float = 7.5
    target_bits: float = 4.0
    warmup_fraction: float = 0.5
    gate_lr: float = 0.01
    # what trains the activation gates: the task loss (task) or the gradient-weighted coding
    # error (fisher: better for causal LMs at 3+ bits)
    act_gate_signal: Literal["task", "fisher"] = "task"
    # AMAQ under a run-level byte budget: the cut's traffic over the whole run (activations up and
    # gradients down, as framed on the wire, warm-up included) comes to this many bytes; the bits
    # after the warm-up are what the budget leaves (target_bits is then not used). 0: off
    budget_bytes: float = 0

    def check(self) -> Problems:
        p = []
        if self.budget_bytes < 0 or not math.isfinite(self.budget_bytes):
            p.append(f"split.budget_bytes: must be >= 0 (0: off), got {self.budget_bytes}")
        elif self.budget_bytes > 0:
            if self.act_codec != "amaq" or self.grad_codec != "amaq":
                p.append(
                    "split.budget_bytes: the byte budget is spent by learned bits; needs "
                    f"act_codec and grad_codec amaq, got {self.act_codec} / {self.grad_codec}"
                )
            if self.all_boundaries:
                p.append(
                    "split.budget_bytes: counts the cut's bytes at the transport; the inner "
                    "boundaries of all_boundaries are not on the wire (use target_bits there)"
                )
        for k in ("cut", "local_steps", "tiny_layers"):
            if getattr(self, k) < 1:
                p.append(f"split.{k}: must be >= 1, got {getattr(self, k)}")
        if self.grad_codec == "aqsgd":
            p.append("split.grad_codec: aqsgd codes activations only (use fixed for gradients)")
        if self.act_codec == "aqsgd" and self.all_boundaries:
            p.append("split.act_codec: aqsgd works at the cut only, not with all_boundaries")
        if not 1 <= self.fixed_bits <= 8:
            p.append(f"split.fixed_bits: must be in 1..8, got {self.fixed_bits}")
        if not 1 <= self.b_min < self.b_max <= 8:
            p.append(
                f"split.b_min/b_max: need 1 <= b_min < b_max <= 8, got {self.b_min}, {self.b_max}"
            )
        elif not self.b_min <= self.init_bits <= self.b_max:
            p.append(f"split.init_bits: must lie in [b_min, b_max], got {self.init_bits}")
        elif not self.b_min <= self.target_bits <= self.b_max:
            p.append(f"split.target_bits: must lie in [b_min, b_max], got {self.target_bits}")
        if not 0 <= self.warmup_fraction <= 1:
            p.append(f"split.warmup_fraction: must be in [0, 1], got {self.warmup_fraction}")
        v = self.act_outlier_ratio
        if not (v == 0 or 1 <= v < float("inf")):
            p.append(f"split.act_outlier_ratio: must be 0 (off) or >= 1, got {v}")
        if self.gate_lr <= 0:
            p.append(f"split.gate_lr: must be > 0, got {self.gate_lr}")
        return p


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "run"
    mode: str = "federated"  # a registered mode (MODE_RULES; fedq.modes)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)

    def check(self) -> Problems:
        p = self._defence_problems()
        if self.privacy.mechanism == "dpsgd" and self.fed.strategy == "fedprox":
            p.append(
                "privacy.mechanism: 'dpsgd' does not support fed.strategy 'fedprox' "
                "(the proximal term is not per-example clipped); use fedavg or fedadam"
            )
        if self.data.site_holdout > 0 and self.privacy.mechanism != "none":
            p.append(
                f"data.site_holdout: the sites' own evaluation figures are sent without noise and "
                f"are not in the privacy accounting of privacy.mechanism "
                f"{self.privacy.mechanism!r}; use one or the other"
            )
        sites = self.runtime.sites
        if sites and sum(s.clients for s in sites) != self.rounds.num_clients:
            p.append(
                f"runtime.sites: the sites hold {sum(s.clients for s in sites)} clients in all "
                f"({' + '.join(str(s.clients) for s in sites)}), but rounds.num_clients is "
                f"{self.rounds.num_clients}"
            )
        rules = MODE_RULES.get(self.mode)
        if rules is None:
            names = " | ".join(repr(m) for m in MODE_RULES)
            return [*p, f"mode: must be one of {names} (the registered modes), got {self.mode!r}"]
        if rules.check is not None:
            p += rules.check(self)
        allowed = rules.privacy
        if self.privacy.mechanism not in allowed:
            p.append(
                f"privacy.mechanism: {self.privacy.mechanism!r} is not available in mode "
                f"{self.mode!r}; use one of {', '.join(allowed)}"
            )
        return p

    def _defence_problems(self) -> Problems:
        """Combinations of ``defence`` with the rest of the run that are unsound or impossible."""
        d, k, p = self.defence, self.rounds.clients_per_round, []
        if self.privacy.mechanism == "central" and d.aggregator != "mean":
            p.append(
                f"defence.aggregator: {d.aggregator!r} does not compose with privacy.mechanism "
                "'central' (its noise is calibrated to the sum of clipped updates, whose "
                "sensitivity a median or a selection does not have); use 'mean' with central DP, "
                "or local DP (dpsgd, laplace) with any aggregator"
            )
        if d.aggregator == "krum":
            if k < 2 * d.krum_f + 3:
                p.append(
                    f"defence.krum_f: Krum with f={d.krum_f} needs rounds.clients_per_round >= "
                    f"2f + 3 = {2 * d.krum_f + 3}, got {k}"
                )
            if d.krum_m > k - d.krum_f:
                p.append(
                    f"defence.krum_m: at most clients_per_round - krum_f = {k - d.krum_f}, "
                    f"got {d.krum_m}"
                )
        return p

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, without the keys the mode does not use (what config.json
        holds, so that it loads back under the same checks)."""
        out = dataclasses.asdict(self)
        for key in MODE_RULES[self.mode].unused:
            section, _, name = key.partition(".")
            if name:
                out[section].pop(name, None)
            else:
                out.pop(section, None)
        return out


@dataclass(frozen=True)
class ModeRules:
    """What the configuration checks for one mode: ``unused``, the keys it does not use (key ->
    why: setting one is an error saying so, and ``config.json`` leaves them out); ``optimizer``,
    the ``(train.optimizer, train.weight_decay)`` it defaults to; ``privacy``, the
    ``privacy.mechanism`` names it offers; ``check``, its problems with a validated config and
    ``check_raw``, with the scenario as written (both optional)."""

    name: str
    unused: Mapping[str, str]
    optimizer: tuple[str, float]
    privacy: tuple[str, ...]
    check: Callable[[RunConfig], Problems] | None = None
    check_raw: Callable[[Mapping[str, Any]], Problems] | None = None


_FEDPROX_FEDADAM = "a FedProx / FedAdam parameter; split mode uses fedavg"


def _split_problems(cfg: RunConfig) -> Problems:
    if cfg.data.standardize:
        return ["data.standardize: mode 'split' reads text, which has no features to scale"]
    return []


def _split_raw_problems(raw: Mapping[str, Any]) -> Problems:
    strategy = (raw.get("fed") or {}).get("strategy") if isinstance(raw.get("fed"), dict) else None
    if strategy not in (None, "fedavg"):
        return [
            f"fed.strategy: mode 'split' averages the clients' state with fedavg only, "
            f"got {strategy!r}"
        ]
    return []


#: The built-in modes' rules (:mod:`fedq.modes` refers to them): local SGD for federated
#: clients; AdamW (torch's default decay) for the LoRA halves of a split model.
FEDERATED_RULES = ModeRules(
    name="federated",
    unused={"split": "split learning settings; this scenario has mode 'federated'"},
    optimizer=("sgd", 0.0),
    privacy=FED_PRIVACY,
)
SPLIT_RULES = ModeRules(
    name="split",
    unused={
        "compression": "mode 'split' codes the cut with split.act_codec / split.grad_codec",
        "defence": "update checks and robust aggregation of federated updates",
        "data.site_holdout": "evaluation on the sites' own rows is federated mode's so far",
        "model.gradient_checkpointing": "gradient checkpointing is federated mode's so far",
        "model.base_lowrank_init": "LoRA from the packing residual is federated mode's so far",
        "train.local_epochs": "mode 'split' runs split.local_steps steps per round",
        **{f"fed.{k}": _FEDPROX_FEDADAM for k in ("proximal_mu", "server_lr", "beta1", "beta2")},
        "fed.tau": _FEDPROX_FEDADAM,
    },
    optimizer=("adamw", 0.01),
    privacy=SPLIT_PRIVACY,
    check=_split_problems,
    check_raw=_split_raw_problems,
)
#: Mode name -> its rules: the built-in modes, and those :mod:`fedq.modes` registered.
MODE_RULES: dict[str, ModeRules] = {r.name: r for r in (FEDERATED_RULES, SPLIT_RULES)}


def register_mode_rules(rules: ModeRules) -> None:
    """Make ``rules.name`` a valid ``mode`` checked by ``rules`` (:func:`fedq.modes.register`)."""
    MODE_RULES[rules.name] = rules


def unregister_mode_rules(name: str) -> None:
    MODE_RULES.pop(name, None)


def _mode_problems(raw: dict[str, Any], mode: str) -> Problems:
    """Keys in the scenario that ``mode`` would ignore (every one, each naming why), and the
    mode's own checks of the scenario as written."""
    rules = MODE_RULES.get(mode)
    if rules is None:
        return []
    p = []
    for key, why in rules.unused.items():
        section, _, name = key.partition(".")
        node = raw.get(section)
        present = section in raw if not name else isinstance(node, dict) and name in node
        if present:
            p.append(f"{key}: not used in mode {mode!r} ({why}); remove it")
    if rules.check_raw is not None:
        p += rules.check_raw(raw)
    return p


def _resolve_mode_defaults(cfg: RunConfig) -> RunConfig:
    optimizer, weight_decay = MODE_RULES[cfg.mode].optimizer
    train = dataclasses.replace(
        cfg.train,
        optimizer=cfg.train.optimizer or optimizer,  # type: ignore[arg-type]
        weight_decay=weight_decay if cfg.train.weight_decay is None else cfg.train.weight_decay,
    )
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------- generic typed loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: Problems) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: Problems = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            problems.append(f"{key}: expected null, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if origin is tuple:  # tuple[X, ...]: a YAML list of X
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return None
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if tp is float else value


def _build(cls: Any, raw: Any, prefix: str, problems: Problems) -> Any:
    where = prefix or "scenario"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(f"{dotted}: unknown key (allowed in {where}: {', '.join(fields)})")
            continue
        before = len(problems)
        out = _coerce(value, hints[key], dotted, problems)
        # Keep nested sections even when some of their keys were bad (those keep defaults), so
        # the value checks below still run and every problem is reported in one go.
        if len(problems) == before or (out is not None and dataclasses.is_dataclass(out)):
            kwargs[key] = out
    return cls(**kwargs)


def _checks(obj: Any) -> Problems:
    """Run every section's ``check()`` (LinkConfig sections are checked by their parent)."""
    out: Problems = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, LinkConfig):
            out += _checks(v)
    return out + obj.check()


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections; raises ConfigError on a clash."""
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a raw mapping."""
    problems: Problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        key, text = item.split("=", 1)
        try:
            set_dotted(raw, key, yaml.safe_load(text))
        except ConfigError as e:
            problems += [f"--set {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return raw


def config_from_dict(raw: Any) -> RunConfig:
    """Validate a raw mapping; raises ConfigError listing every problem."""
    problems: Problems = []
    raw = raw if raw is not None else {}
    if isinstance(raw, dict):
        raw, problems = _moved_problems(raw)
    cfg = _build(RunConfig, raw, "", problems)
    if cfg is not None:
        problems += _checks(cfg)
        problems += _mode_problems(raw, cfg.mode)
    if problems:
        raise ConfigError(problems)
    return _resolve_mode_defaults(typing.cast(RunConfig, cfg))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file (or a ``.json`` file, such as a run's saved ``config.json``) that must hold
    a mapping; every failure is a ConfigError naming the file.

    JSON goes through :mod:`json`, not the YAML loader: YAML 1.1 reads a JSON number such as
    ``1e-05`` (no dot) as a string."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        text = p.read_text()
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ConfigError(f"{p}: not valid {kind}: {e}") from None
    if raw is None:  # nothing but blanks and comments: surely not the file meant
        raise ConfigError(f"{p}: the {what} file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a {what} must be a mapping, got {type(raw).__name__}")
    return raw


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a scenario YAML file (with optional ``key=value`` overrides); a ``.json``
    file is a run's saved ``config.json`` (``--resume``), read with :func:`migrate_saved`."""
    raw = read_yaml_mapping(path, "scenario")
    if Path(path).suffix == ".json":
        raw = migrate_saved(raw)
    return config_from_dict(apply_overrides(raw, overrides or []))
