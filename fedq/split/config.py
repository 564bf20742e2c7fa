"""``split:`` section of a scenario: where the model is cut and how the cut is coded.

Rounds, clients and evaluation cadence come from the ``fed`` section (``fed.rounds``,
``fed.num_clients``, ``fed.clients_per_round``, ``fed.eval_every``), the LoRA optimizer from
``train``; this section holds only what is specific to split learning and AMAQ
(ALGORITHMS.md §1 and §4). Defaults are our [I] choices, documented in :mod:`fedq.adapt.amaq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Codec = Literal["amaq", "fixed", "none", "aqsgd"]


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """Split learning / SplitFed with AMAQ (see module docstring)."""

    cut: int = 3  # the client holds embeddings + blocks [0, cut); the server the rest
    all_boundaries: bool = False  # also quantize every block boundary inside each half
    local_steps: int = 10  # R: split steps per client per round; client LoRA FedAvg'd after
    tiny_layers: int = 4  # blocks of the tiny random test models (tiny_bert_lora, tiny_llama)
    # -- codec of each direction: amaq (learned bits), fixed (QAT-Group), none (fp32);
    # activations only: aqsgd (AQ-SGD baseline, fixed_bits on each example's change since its
    # last visit, fedq.adapt.aqsgd)
    act_codec: Codec = "amaq"
    grad_codec: Codec = "amaq"
    fixed_bits: int = 4  # fixed: bits of both directions
    fixed_granularity: Literal["channel", "group"] = "channel"
    group_size: int = 128
    act_scale_dtype: Literal["float16", "float32"] = "float16"
    grad_scale_dtype: Literal["float16", "float32"] = "float32"  # gradients are tiny
    # unbiased stochastic rounding (floor(v + u)) of the gradient direction, fixed and AMAQ alike:
    # E[g_hat] = g, so low-bit rounding bias does not accumulate in the client's LoRA updates.
    # On by default: MiniLM 200 steps at 2 bits, fixed 67.8 -> 78.5, AMAQ 75.8 -> 78.5 (seed 0,
    # BENCHMARKS.md "Split learning"); false gives the round-to-nearest runs recorded before it.
    grad_stochastic: bool = True
    # block ranges of both directions and codecs (fedq.codec.quantize): min-max; clipped to
    # mean +- k_b std (sigma: the Gaussian-optimal uniform quantizer at b bits); or, per block,
    # the least-error of mean +- f k_b std, f in 1..3, and min-max (mse: heavy-tailed channels,
    # e.g. an LLM's residual stream, want wider ranges than a Gaussian; SmolLM2 untuned 3-bit
    # perplexity +7.0% -> +5.4% over fp32, 4-bit +2.0% -> +0.3%)
    quant_range: Literal["minmax", "sigma", "mse"] = "mse"
    # divide each token's vector by its RMS first (float16, 2 bytes per token, sent): per-channel
    # blocks then see one scale per channel and per token ("two-way" scaling)
    row_scale: bool = True
    # tokens whose RMS exceeds this many times the median token's are sent as float16 rows
    # (0 = off): the attention-sink "massive activations" of pre-norm causal LMs (SmolLM2: 3-bit
    # untuned perplexity 364 -> 135, fp32 129). MiniLM's post-norm activations never reach 1.2x,
    # so nothing is sent there. Gradients: off (their per-token size varies 20x by design; the
    # row scales carry that).
    act_outlier_ratio: float = 3.0
    grad_outlier_ratio: float = 0.0
    # -- AMAQ gates and regularizer
    b_min: int = 2
    b_max: int = 8
    init_bits: float = 7.5
    alpha: float = 1.0
    per_token: bool = False
    target_bits: float = 4.0
    # budget: exact projection onto the scheduled target (default); target / mean: penalties
    reg_mode: Literal["budget", "target", "mean"] = "budget"
    reg_lambda: float = 1.0  # penalty modes only
    warmup_fraction: float = 0.5  # of all steps: the target moves from init_bits to target_bits
    gate_lr: float = 0.01  # budget: normalised-SGD step in logit units; penalty modes: Adam lr
    gate_momentum: float = 0.9  # budget mode only
    # what trains the activation gates: the task loss through the LSQ step size (task), or the
    # Fisher-weighted distortion sum(g^2 (x_hat - x)^2) with g the gradient that comes back
    # (fisher: the second-order estimate of the loss the coding costs). Gradient gates always
    # use their relative error.
    act_gate_signal: Literal["task", "fisher"] = "task"
    # budget mode: from this fraction of all steps on the gates take no task-loss step, so the
    # integer bit map stops changing once the target holds (1 = never freeze)
    gate_freeze_fraction: float = 1.0

    def check(self) -> list[str]:
        p = []
        for k in ("cut", "local_steps", "tiny_layers", "group_size"):
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
        if self.alpha <= 0:
            p.append(f"split.alpha: must be > 0, got {self.alpha}")
        if self.reg_lambda < 0:
            p.append(f"split.reg_lambda: must be >= 0, got {self.reg_lambda}")
        if not 0 <= self.warmup_fraction <= 1:
            p.append(f"split.warmup_fraction: must be in [0, 1], got {self.warmup_fraction}")
        for k in ("act_outlier_ratio", "grad_outlier_ratio"):
            v = getattr(self, k)
            if not (v == 0 or 1 <= v < float("inf")):
                p.append(f"split.{k}: must be 0 (off) or >= 1, got {v}")
        if not 0 <= self.gate_freeze_fraction <= 1:
            p.append(
                f"split.gate_freeze_fraction: must be in [0, 1], got {self.gate_freeze_fraction}"
            )
        elif self.gate_freeze_fraction < 1 and self.reg_mode != "budget":
            p.append("split.gate_freeze_fraction < 1 needs split.reg_mode: budget")
        if self.gate_lr <= 0:
            p.append(f"split.gate_lr: must be > 0, got {self.gate_lr}")
        if not 0 <= self.gate_momentum < 1:
            p.append(f"split.gate_momentum: must be in [0, 1), got {self.gate_momentum}")
        return p
