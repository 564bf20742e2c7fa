"""A frozen base held in fedq's packed low-bit format (``model.base_bits``).

Every frozen ``nn.Linear`` of a model (PEFT's LoRA layers keep theirs as ``base_layer``) is
replaced by a :class:`PackedLinear`: its weight quantized once with fedq's codec (one scale and
offset per group of ``group_size`` values along each row, the least-error clip per group, at a
fixed width) and kept only as the packed tensor. Each forward decodes the weight for that one
matrix multiply through the codec's dispatch (the Triton kernels on CUDA, not yet run on a GPU;
the torch path elsewhere) and drops it; the backward pass decodes it again for the input's
gradient, so no fp32 copy of a weight outlives the layer's call. LoRA, norms, embeddings and the
(tied) LM head stay as they are. The choices: docs/algorithms.md §6.7.

:func:`load_packed_causal_lm` builds such a base straight from a safetensors checkpoint: the
model's skeleton is made without weights (accelerate's empty initialisation), and the checkpoint is
read one tensor at a time, each frozen linear weight packed as it is read, so the whole base never
exists in fp32 (peak: the packed base, the unpacked tensors, and one fp32 matrix). LoRA then goes
on top through PEFT (:func:`packed_lora_linear` is PEFT's own LoRA linear layer, told how to read a
packed layer's shape), in the same module order and so with the same initialisation as on the
full-precision base.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedq.codec import Granularity, PackedTensor, QuantSpec, dequantize, quantize
from fedq.codec.packed import expected_payload_nbytes
from fedq.errors import ConfigError

#: Linear layers left in full precision whatever ``base_bits`` says (the LM head is often tied
#: to the input embeddings, which stay as they are).
KEEP = ("lm_head",)


class _PackedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` decoded from the layer's packed weight in forward and again in
    backward (nothing of ``W`` is saved for backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight_like(x), layer.bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g @ ctx.layer.weight_like(g), None


@dataclass(frozen=True, slots=True)
class Width:
    """How one matrix is packed: ``bits`` per value, one scale and offset per ``group_size``."""

    bits: int
    group_size: int


#: What a memory budget (``model.base_budget_mb``) chooses among, per matrix.
BUDGET_WIDTHS = tuple(Width(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))


#: Rows of a matrix the error of each width is measured on (every k-th row; the error is scaled
#: to the whole matrix), so a budget costs a few quantizations of a sample, not of every matrix.
SAMPLE_ROWS = 64


def width_options(
    weight: torch.Tensor, moments: torch.Tensor | None = None
) -> list[tuple[int, float]]:
    """``(packed bytes, error)`` of ``weight`` at each of :data:`BUDGET_WIDTHS`: the bytes
    exactly (payload and metadata), the error measured on every k-th row (at most
    :data:`SAMPLE_ROWS` rows) and scaled to the whole matrix. The error is the squared
    reconstruction error, each column weighted by ``moments`` (the mean square of that input
    feature, :func:`input_moments`) when given: then it estimates ``E ||(W - Q) x||^2``, the
    error the layer's output takes, rather than the weights'."""
    w = weight.detach().float().cpu()
    sample = w[:: max(1, w.shape[0] // SAMPLE_ROWS)]
    weights = None if moments is None else moments.float().cpu().reshape(1, -1)
    out = []
    for width in BUDGET_WIDTHS:
        spec = _spec(width.group_size)
        p = quantize(sample, width.bits, spec)
        sq = (dequantize(p) - sample).square()
        if weights is not None:
            sq = sq * weights
        err = float(sq.sum()) * w.shape[0] / sample.shape[0]
        full, part = spec.layout_for(tuple(w.shape)), spec.layout_for(tuple(sample.shape))
        widths = torch.full((full.num_blocks,), width.bits, dtype=torch.uint8)
        meta = p.metadata_nbytes // part.num_blocks * full.num_blocks  # the same per block
        out.append((expected_payload_nbytes(full, widths) + meta, err))
    return out


@torch.no_grad()
def input_moments(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean square of each input feature of every linear layer a packed base packs, over
    the tokens of ``batches`` (keyword inputs of ``model``): by layer name, a vector of
    ``in_features`` values (the diagonal of the inputs' second-moment matrix)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear) or (type(m) is nn.Linear and not kept(name)):

            def record(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.square().sum(dim=0)
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks.append(m.register_forward_hook(record))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in sums}


def allocate(
    options: Mapping[str, Sequence[tuple[int, float]]], budget_bytes: float
) -> dict[str, Width]:
    """The width per matrix (one of :data:`BUDGET_WIDTHS`, whose ``(bytes, error)`` each matrix's
    ``options`` lists) with the least total squared error whose bytes fit ``budget_bytes``: a
    multiple-choice knapsack, solved exactly as an integer program (scipy's HiGHS)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = sorted(options)
    k = len(BUDGET_WIDTHS)
    cost = np.array([options[n][j][0] for n in names for j in range(k)], dtype=np.float64)
    least = float(sum(min(b for b, _ in options[n]) for n in names))
    if budget_bytes < least:
        raise ConfigError(
            f"model.base_budget_mb: {budget_bytes / 2**20:.2f} MiB is below the smallest packed "
            f"base ({least / 2**20:.2f} MiB: every matrix at 2 bits)"
        )
    # errors in units of the mean error: HiGHS's tolerances are absolute
    err = np.array([options[n][j][1] for n in names for j in range(k)], dtype=np.float64)
    err = err / max(float(err.mean()), 1e-30)
    one_each = np.kron(np.eye(len(names)), np.ones(k))
    result = milp(
        err,
        integrality=np.ones(err.size),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(cost[None, :], 0, budget_bytes),
        ],
    )
    if result.x is None:
        raise ConfigError(f"model.base_budget_mb: no allocation found ({result.message})")
    x = result.x.reshape(len(names), k)
    return {n: BUDGET_WIDTHS[int(x[i].argmax())] for i, n in enumerate(names)}


def plan_widths(
    names: Iterable[str],
    read: Callable[[str], torch.Tensor],
    *,
    bits: int | None,
    group_size: int = 64,
    budget_bytes: float | None = None,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Width]:
    """The width of each of the weights ``names``: ``bits`` and ``group_size`` for all, or
    (``budget_bytes``) the allocation of :func:`allocate`, which reads each weight (``read``) to
    measure its error at every width (weighted by its inputs' ``moments`` where given)."""
    if budget_bytes is None:
        if bits is None:
            raise ConfigError("a packed base needs model.base_bits or model.base_budget_mb")
        if not 2 <= bits <= 8:
            raise ConfigError(f"model.base_bits: must be in 2..8, got {bits}")
        return {name: Width(bits, group_size) for name in names}
    m = moments or {}
    return allocate({n: width_options(read(n), m.get(n)) for n in names}, budget_bytes)


def _spec(group_size: int) -> QuantSpec:
    return QuantSpec(granularity=Granularity.GROUP, group_size=group_size, range="mse")


def kept(name: str) -> bool:
    """Whether the linear layer called ``name`` stays in full precision (:data:`KEEP`)."""
    return any(name.endswith(k) or f"{k}." in name for k in KEEP)


class PackedLinear(nn.Module):
    """A frozen linear layer whose weight lives packed (module docstring)."""

    bias: torch.Tensor | None

    def __init__(
        self,
        packed: PackedTensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in packed.shape)
        self.bits = bits
        self.packed = packed
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._device = torch.device(device)

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int = 64,
    ) -> PackedLinear:
        """The layer ``x @ weight.T + bias`` with ``weight`` quantized to ``bits`` (one scale and
        offset per ``group_size`` values of a row, least-error clip)."""
        if not 2 <= bits <= 8:
            raise ConfigError(f"model.base_bits: must be in 2..8, got {bits}")
        packed = quantize(weight.detach().float().cpu(), bits, _spec(group_size))
        return cls(packed, bias, bits=bits, device=weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 64) -> PackedLinear:
        return cls.pack(linear.weight, linear.bias, bits=bits, group_size=group_size)

    def weight_like(self, x: torch.Tensor) -> torch.Tensor:
        """The decoded weight, on ``x``'s device and in its dtype."""
        return dequantize(self.packed, device=x.device).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (a fresh tensor; for code that inspects a layer, not for forward)."""
        return dequantize(self.packed, device=self._device)

    def packed_nbytes(self) -> int:
        return int(self.packed.payload_nbytes + self.packed.metadata_nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PackedMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quantize_base(
    model: nn.Module,
    bits: int | None,
    group_size: int = 64,
    budget_bytes: float | None = None,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Replace every frozen ``nn.Linear`` of ``model`` (not those named in :data:`KEEP`, not
    trainable ones such as LoRA's A and B) by a :class:`PackedLinear`, at ``bits`` or within
    ``budget_bytes`` (:func:`plan_widths`); returns ``{"layers": n, "fp32_bytes": ...,
    "packed_bytes": ...}`` of what was replaced."""
    swaps: dict[str, tuple[nn.Module, str, nn.Linear]] = {}
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not child.weight.requires_grad and not kept(full):
                swaps[full] = (parent, child_name, child)
    plan = plan_widths(
        swaps,
        lambda n: swaps[n][2].weight,
        bits=bits,
        group_size=group_size,
        budget_bytes=budget_bytes,
        moments=moments,
    )
    fp32 = packed = 0
    for full, (parent, child_name, child) in swaps.items():
        width = plan[full]
        layer = PackedLinear.pack(
            child.weight, child.bias, bits=width.bits, group_size=width.group_size
        )
        fp32 += child.weight.numel() * 4
        packed += layer.packed_nbytes()
        setattr(parent, child_name, layer)
    release_freed_memory()
    return {"layers": len(swaps), "fp32_bytes": fp32, "packed_bytes": packed}


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every packed weight in ``model`` (payload and scales)."""
    return sum(m.packed_nbytes() for m in model.modules() if isinstance(m, PackedLinear))


# ------------------------------------------------------------------------ loading packed


def packable_params(config: Any) -> int:
    """Weights of the linear layers a packed base packs, for the causal LM of ``config`` (no
    weights read): a budget of ``b`` bits per weight is ``b * this / 8`` bytes."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return sum(
        m.weight.numel() for n, m in model.named_modules() if type(m) is nn.Linear and not kept(n)
    )


def release_freed_memory() -> None:
    """Hand memory the allocator holds but no longer uses back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). Packing a base frees many matrix-sized temporaries,
    which glibc keeps in its heap: for SmolLM2-135M about 240 MiB a site would hold for the
    whole run."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def safetensors_files(root: Path) -> list[Path]:
    """The safetensors files of the checkpoint directory ``root`` (one file, or the shards its
    index names); empty when its weights are in another format."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text()).get("weight_map", {}).values()
        return sorted({root / s for s in shards})
    single = root / "model.safetensors"
    return [single] if single.is_file() else []


def load_packed_causal_lm(
    root: Path,
    config: Any,
    bits: int | None,
    group_size: int = 64,
    budget_bytes: float | None = None,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module | None:
    """The causal LM of ``config`` with its weights read from the safetensors checkpoint at
    ``root``, every frozen linear layer (not :data:`KEEP`) packed as its weight is read, at
    ``bits`` or within ``budget_bytes`` (a first pass over those weights measures each width's
    error, :func:`plan_widths`); frozen, in eval mode. None when the checkpoint is not
    safetensors or its tensor names are not the model's own (a checkpoint transformers must
    rename on load): the caller then loads the base whole and packs it (:func:`quantize_base`)."""
    where, read = checkpoint_tensors(root)
    if not where:
        return None
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    targets = {n for n, m in model.named_modules() if type(m) is nn.Linear and not kept(n)}
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers()}
    weight_of = {f"{t}.weight": t for t in targets}
    if set(weight_of) - where.keys() or set(where) - names - weight_of.keys():
        return None  # names the model does not have, or lacks: transformers would rename them
    plan = plan_widths(
        sorted(targets),
        lambda name: read(f"{name}.weight"),
        bits=bits,
        group_size=group_size,
        budget_bytes=budget_bytes,
        moments=moments,
    )
    for key in where:
        if key in weight_of:
            name = weight_of[key]
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child_name)
            if linear.bias is not None and linear.bias.is_meta:
                bias_key = f"{name}.bias"
                set_module_tensor_to_device(model, bias_key, "cpu", value=read(bias_key))
            width = plan[name]
            layer = PackedLinear.pack(
                read(key), linear.bias, bits=width.bits, group_size=width.group_size
            )
            setattr(parent, child_name, layer)
        elif not key.endswith(".bias") or key.rpartition(".")[0] not in targets:
            set_module_tensor_to_device(model, key, "cpu", value=read(key))
    model.tie_weights()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None  # something the checkpoint did not hold (and transformers would make)
    model.requires_grad_(False)
    release_freed_memory()
    return model.eval()


# ------------------------------------------------------------------------ a packed base on disk

#: The file ``fedq quantize-base`` writes beside the model's config and tokenizer: the packed
#: layers' fields and the other weights, with the layers' description in its metadata.
PACKED_FILE = "fedq-packed-base.safetensors"
#: Version of that file's layout.
PACKED_FORMAT = 1
_FIELDS = ("bits", "scales", "offsets", "payload", "row_scales", "outlier_index", "outlier_values")


def is_packed_checkpoint(root: Path) -> bool:
    """Whether the model directory ``root`` holds a base made by :func:`save_packed`."""
    return (root / PACKED_FILE).is_file()


def save_packed(model: nn.Module, out: Path, *, source_sha256: str) -> dict[str, Any]:
    """Write ``model``'s weights, its packed layers as they are, to ``out /`` :data:`PACKED_FILE`
    (tied tensors once); returns the description stored in the file's metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            p = m.packed
            for field in _FIELDS:
                t = getattr(p, field)
                if t is not None:
                    tensors[f"{name}.packed.{field}"] = t.contiguous()
            layers[name] = {
                "shape": list(p.shape),
                "dtype": p.dtype,
                "encoding": p.encoding.value,
                "granularity": p.granularity.value,
                "axis": p.axis,
                "group_size": p.group_size,
                "symmetric": p.symmetric,
                "scale_dtype": p.scale_dtype,
                "version": p.version,
                "bits": m.bits,
            }
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue  # tied to a tensor written already (the LM head to the embeddings)
        seen.add(t.data_ptr())
        tensors[key] = t.contiguous()
    info = {
        "format": PACKED_FORMAT,
        "layers": layers,
        "source_sha256": source_sha256,
        "packed_bytes": packed_bytes(model),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PACKED_FILE), metadata={"fedq": json.dumps(info)})
    return info


def packed_info(root: Path) -> dict[str, Any]:
    """The description :func:`save_packed` stored in ``root``'s packed file."""
    from safetensors import safe_open

    with safe_open(str(root / PACKED_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        info = json.loads(meta["fedq"])
    except (KeyError, ValueError):
        raise ConfigError(f"{root / PACKED_FILE}: not a packed base written by fedq") from None
    if info.get("format") != PACKED_FORMAT:
        raise ConfigError(
            f"{root / PACKED_FILE}: packed base format {info.get('format')!r}; this fedq reads "
            f"format {PACKED_FORMAT} (make it again with fedq quantize-base)"
        )
    return dict(info)


def load_packed_checkpoint(root: Path, config: Any) -> nn.Module:
    """The causal LM of ``config`` from the packed base in ``root`` (:func:`save_packed`), read
    one tensor at a time; frozen, in eval mode."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    from fedq.codec import Encoding

    info = packed_info(root)
    file = str(root / PACKED_FILE)
    with init_empty_weights(include_buffers=False):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def read(key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:  # one tensor's pages at a time
            return f.get_tensor(key).clone()

    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
    layers: dict[str, dict[str, Any]] = info["layers"]
    for name, desc in layers.items():
        try:
            present = [k for k in _FIELDS if f"{name}.packed.{k}" in keys]
            fields = {k: read(f"{name}.packed.{k}") for k in present}
            packed = PackedTensor(
                shape=tuple(desc["shape"]),
                dtype=desc["dtype"],
                encoding=Encoding(desc["encoding"]),
                granularity=Granularity(desc["granularity"]),
                axis=int(desc["axis"]),
                group_size=int(desc["group_size"]),
                symmetric=bool(desc["symmetric"]),
                scale_dtype=desc["scale_dtype"],
                bits=fields["bits"],
                scales=fields["scales"],
                offsets=fields.get("offsets"),
                payload=fields["payload"],
                row_scales=fields.get("row_scales"),
                outlier_index=fields.get("outlier_index"),
                outlier_values=fields.get("outlier_values"),
                version=int(desc["version"]),
            )
            layout = packed.layout
            if not (
                packed.bits.numel() == packed.scales.numel() == layout.num_blocks
                and packed.payload.numel() == expected_payload_nbytes(layout, packed.bits)
            ):
                raise ConfigError(f"{file}: layer {name}'s packed fields do not match its shape")
            bias = read(f"{name}.bias") if f"{name}.bias" in keys else None
            parent_name, _, child_name = name.rpartition(".")
            layer = PackedLinear(packed, bias, bits=int(desc["bits"]))
            setattr(model.get_submodule(parent_name), child_name, layer)
        except ConfigError:
            raise
        except (KeyError, AttributeError, ValueError, TypeError) as e:
            raise ConfigError(f"{file}: layer {name} cannot be rebuilt ({e!r})") from None
    for key in sorted(keys):
        owner = key.rpartition(".")[0]
        if ".packed." in key or owner in layers:
            continue
        set_module_tensor_to_device(model, key, "cpu", value=read(key))
    model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise ConfigError(f"{file}: the packed base lacks {missing[:3]}")
    model.requires_grad_(False)
    release_freed_memory()
    return model.eval()


# ------------------------------------------------------------------------ LoRA on a packed base


#: Alternations of LQ-LoRA's decomposition at most (it stops early when the error rises).
LOWRANK_ITERATIONS = 5


def checkpoint_tensors(root: Path) -> tuple[dict[str, Path], Callable[[str], torch.Tensor]]:
    """The tensors of the safetensors checkpoint at ``root`` (name -> file; empty for a
    checkpoint in another format) and a reader of one of them by name, floats as fp32. The file
    is reopened for every tensor: it is memory-mapped, and the pages read stay resident while it
    is open, so this keeps the peak to one tensor's pages; the tensor is a copy, as one viewing
    the mapping would keep the whole file mapped."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in safetensors_files(root):
        with safe_open(str(file), framework="pt") as f:
            where.update((key, file) for key in f.keys())  # noqa: SIM118 (not a mapping)

    def read(key: str) -> torch.Tensor:
        with safe_open(str(where[key]), framework="pt") as f:
            value = f.get_tensor(key)
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            return value.to(dtype, copy=True)

    return where, read


@torch.no_grad()
def lowrank_init(
    model: nn.Module,
    weight: Callable[[str], torch.Tensor],
    adapter: str = "default",
    iterations: int = LOWRANK_ITERATIONS,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LQ-LoRA's start for every LoRA layer of ``model`` (a PEFT model) over a
    :class:`PackedLinear`: with ``W = weight(name + ".weight")`` (the full-precision matrix, by
    its name in the base model), alternate ``L = SVD_r(W - Q)`` and ``Q = pack(W - L)`` from
    ``Q = 0`` at the layer's width and group size, keeping the pair with the least
    ``||W - Q - L||_F`` (at most ``iterations``; stops when the error rises, and keeps plain
    packing with ``L = 0`` when that is best). The layer then holds ``Q``, and LoRA starts at
    ``B A * scaling = L`` (``A = sqrt(S) V^T / sqrt(scaling)``, ``B = U sqrt(S) /
    sqrt(scaling)``). Returns each layer's starting ``(A, B)`` by name: what an adapter for the
    full-precision base must subtract (:meth:`fedq.models.hf.CausalLMBundle.save_adapter`)."""
    peft_model: Any = model
    base: nn.Module = peft_model.get_base_model() if hasattr(model, "get_base_model") else model
    start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layer: Any
    for name, layer in base.named_modules():
        inner = getattr(layer, "base_layer", None)
        if not isinstance(inner, PackedLinear) or adapter not in getattr(layer, "lora_A", {}):
            continue
        w = weight(f"{name}.weight").float()
        r = int(layer.r[adapter])
        scaling = float(layer.scaling[adapter])
        spec = _spec(inner.packed.group_size)
        best_err = float((w - dequantize(inner.packed)).norm())
        best: tuple[PackedTensor, torch.Tensor, torch.Tensor] | None = None
        q_dec = torch.zeros_like(w)
        for _ in range(iterations):
            u, sv, vh = torch.linalg.svd(w - q_dec, full_matrices=False)
            root = sv[:r].sqrt()
            b, a = u[:, :r] * root, root[:, None] * vh[:r]
            low = b @ a
            q = quantize(w - low, inner.bits, spec)
            q_dec = dequantize(q)
            err = float((w - q_dec - low).norm())
            if err >= best_err:
                break
            best_err, best = err, (q, a, b)
        a_layer, b_layer = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if best is not None:
            inner.packed = best[0]
            a_layer.copy_(best[1] / scaling**0.5)
            b_layer.copy_(best[2] / scaling**0.5)
        start[name] = (a_layer.detach().clone(), b_layer.detach().clone())
    return start


@functools.cache
def packed_lora_linear() -> type:
    """PEFT's LoRA linear layer for a :class:`PackedLinear` base layer: PEFT's own class, told
    how to read a packed layer's shape (PEFT reads it from known layer types only). Made on
    first use, as PEFT is imported only when a model needs it."""
    from peft.tuners.lora.layer import Linear

    class PackedLoraLinear(Linear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            assert isinstance(module, PackedLinear)
            return module.in_features, module.out_features

    return PackedLoraLinear


def lora_on_packed(config: Any) -> Any:
    """``config`` (PEFT's ``LoraConfig``) told to wrap :class:`PackedLinear` layers with
    :func:`packed_lora_linear`'s class."""
    config._register_custom_module({PackedLinear: packed_lora_linear()})
    return config
