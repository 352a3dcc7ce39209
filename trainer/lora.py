"""LoRA adapters for the native trainer: y = x W^T + dropout(x) A^T B^T * (alpha / r).

Where: every ``nn.Linear`` inside ``model.layers`` whose attribute name is in ``peft.targets`` (the MLA
projections, dense MLPs and shared experts). Routed experts (stacked parameters in ``GroupedExperts``),
the routers, ``lm_head`` and the MTP modules (``model.mtp``) get no adapters; this matches the planner's
count, :func:`launcher.memory.lora_params`, which covers the decoder layers only. Everything that is not
an adapter is frozen, MTP included.

Names: a wrapped projection keeps its base weight as ``<name>.weight`` (state-dict and Hugging Face keys
unchanged) and adds ``<name>.lora_A.weight`` [r, in] and ``<name>.lora_B.weight`` [out, r].

Initialisation: A ~ kaiming_uniform(a=sqrt(5)) (as PEFT), B = 0, so an adapted model starts out equal to
its base. A is drawn from a generator seeded by (seed, module name): reproducible and independent of
the order of modules and of the parallel layout. On a meta-device model the order is::

    build_model(cfg, device="meta") -> apply_lora -> parallelise -> materialise (to_empty + init) -> init_lora

(``init_lora`` last: the base model's initialisers also write the adapter tensors, or leave them empty.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.hf_io import local_region
from trainer.parallel import seeded_generator

ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRAFactor(nn.Module):
    """One low-rank factor: a bare ``weight`` [out, in] applied as ``F.linear``.

    Deliberately not an ``nn.Linear``: the model's initialisers (``DeepseekV3.init_weights``) walk
    ``nn.Linear`` modules with one seeded stream, and must not spend draws on (or overwrite) adapters.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. Shares (does not copy) the base parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        w = base.weight
        super().__init__(base.in_features, base.out_features, bias=False, device="meta", dtype=w.dtype)
        self.weight = w  # the base Parameter itself: its key stays "<name>.weight"
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = LoRAFactor(base.in_features, rank, device=w.device, dtype=w.dtype)
        self.lora_B = LoRAFactor(rank, base.out_features, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)), B = 0. Writes only this rank's part of sharded (DTensor) factors."""
        full = nn.init.kaiming_uniform_(torch.empty(self.lora_A.weight.shape), a=math.sqrt(5), generator=generator)
        local, region = local_region(self.lora_A.weight)
        local.copy_(full[region])
        local_region(self.lora_B.weight)[0].zero_()

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in fp32, shaped like the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _is_adapter_key(name: str) -> bool:
    return any(part in ADAPTER_NAMES for part in name.split("."))


def _generator(seed: int, name: str) -> torch.Generator:
    # Strip wrapper segments (activation checkpointing, torch.compile) so names match before/after wrapping.
    name = ".".join(p for p in name.split(".") if p not in ("_checkpoint_wrapped_module", "_orig_mod"))
    return seeded_generator(seed, "lora", name)


def apply_lora(model: nn.Module, peft_cfg, seed: int = 0) -> list[str]:
    """Wrap the targeted projections of ``model.layers`` in :class:`LoRALinear` and freeze everything else.

    ``peft_cfg``: a :class:`launcher.recipe.Peft` (method, rank, alpha, dropout, targets). Returns the
    wrapped modules' names (as in ``model.named_modules()``). Adapters are created on their base weight's
    device and dtype and initialised at once, except on the meta device: call :func:`init_lora` after
    materialising. Raises ValueError for a target this model does not have, or when nothing matches.
    """
    if getattr(peft_cfg, "method", "lora") != "lora":
        raise ValueError(f"apply_lora needs peft.method 'lora', got {peft_cfg.method!r}")
    if peft_cfg.rank < 1:
        raise ValueError(f"peft.rank must be >= 1, got {peft_cfg.rank}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("LoRA is already applied to this model")
    targets = list(peft_cfg.targets)
    linears = [(name, m) for name, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)]
    # Known: any linear in the layers, or a name the config allows (e.g. gate_proj where only routed experts have it).
    known = {name.rpartition(".")[2] for name, _ in linears}
    if hasattr(model, "cfg"):
        known |= set(model.cfg.lora_target_modules())
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; this model has: {', '.join(sorted(known))}")
    chosen = [(name, m) for name, m in linears if name.rpartition(".")[2] in targets]
    if not chosen:
        raise ValueError(f"no nn.Linear in model.layers matches the LoRA targets {targets}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in chosen:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LoRALinear(base, peft_cfg.rank, peft_cfg.alpha, peft_cfg.dropout))
    if not any(p.is_meta for n, p in model.named_parameters() if _is_adapter_key(n)):
        init_lora(model, seed)
    return [name for name, _ in chosen]


@torch.no_grad()
def init_lora(model: nn.Module, seed: int = 0) -> None:
    """(Re)initialise every adapter: A ~ kaiming_uniform(a=sqrt(5)) seeded by (seed, module name), B = 0."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters(_generator(seed, name))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


def count_lora_params(model: nn.Module) -> int:
    """Adapter parameters (global sizes, also for sharded tensors)."""
    return sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in model.modules() if isinstance(m, LoRALinear))


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold B @ A * scaling into each base weight in place and put plain ``nn.Linear`` modules back.

    Afterwards the model computes what the adapted one did (dropout aside), has the base model's state
    dict keys, and can be exported with ``model.hf_io.save_hf``. Parameters keep their requires_grad.
    Needs whole (not sharded) weights. Returns the merged modules' names.
    """
    merged = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        if hasattr(m.weight, "to_local"):
            raise ValueError(f"merge_lora needs whole weights; {name}.weight is sharded (gather it first)")
        m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
        merged.append(name)
    return merged


def freeze_in_bf16(model: nn.Module) -> None:
    """Store every frozen parameter in bf16 (call on the meta-device model, before parallelising).

    Training computes in bf16 anyway (FSDP casts for forward and backward), so this changes no
    number; it drops the fp32 copy nothing updates. Adapters stay fp32 (they are trained)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and p.dtype == torch.float32:
                setattr(module, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
