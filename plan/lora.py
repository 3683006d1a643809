"""LoRA layers around frozen ``nn.Linear`` modules, injected by module-name patterns.

A :class:`LoRALinear` computes ``y = W x + b + s * B A dropout(x) + B_past A_past x``:

* ``W, b``: the wrapped base layer, frozen;
* ``A, B`` (``lora_A``, ``lora_B``): the one trainable slot. These ``Parameter`` objects live for the whole
  run, so an optimizer built once keeps tracking them; a task end copies their values into the frozen stack
  and re-initialises them, a federated client switch loads other values into them;
* ``A_past, B_past``: the frozen stack of finished adapters, kept as concatenated buffers with each adapter's
  scale folded into its ``B`` block, so the whole stack is one low-rank product.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from plan.errors import ConfigError, require
from plan.kernels import KERNELS, check_kernel, stacked_lora_linear
from plan.models import resolve_model_path
from plan.subspace import compress_factors


@dataclass
class LoRAConfig:
    """What to adapt and how: PEFT's ``LoraConfig`` fields under the same names. ``target_modules`` left
    ``None`` adapts what PEFT adapts by default for the model's type (the attention's query and value
    projections: ``query``/``value`` in BERT, ``q_proj``/``v_proj`` in Llama, ``c_attn`` in GPT-2)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    kernel: str = "auto"  # auto | triton | torch: the path of the LoRA layers' forward/backward (plan.kernels)

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing or fail later; ``rank`` is checked per layer at injection,
        where its valid range 1..min(in, out) is known."""
        require(
            self.alpha > 0,
            f"lora.alpha must be > 0, got {self.alpha}: the update is scaled by alpha/rank, so alpha 0 never "
            "moves the adapters and a negative alpha flips them (a common choice is alpha = 2 * rank)",
        )
        require(
            0 <= self.dropout < 1,
            f"lora.dropout must be in [0, 1), got {self.dropout}: it is the probability of zeroing an input",
        )
        require(
            self.kernel in KERNELS, f"lora.kernel must be one of {', '.join(map(repr, KERNELS))}; got {self.kernel!r}"
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# Checkpoints hold the LoRAConfig among the model's hyperparameters: allow it under torch.load(weights_only=True).
torch.serialization.add_safe_globals([LoRAConfig])


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a frozen stack of past adapters and one trainable low-rank slot."""

    past_A: Tensor  # buffers, registered in __init__ and replaced as the stack grows
    past_B: Tensor

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, name: str = "", kernel: str = "auto"
    ) -> None:
        super().__init__()
        self.kernel = check_kernel(kernel)
        limit = min(base.in_features, base.out_features)
        if not 0 < rank <= limit:
            raise ConfigError(
                f"LoRA rank {rank} does not fit layer '{name}' ({base.in_features} -> {base.out_features}): "
                f"rank must be in 1..{limit}"
            )
        self.base_layer = base
        base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory: dict[str, Any] = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        self.register_buffer("past_A", torch.empty(0, base.in_features, **factory))
        self.register_buffer("past_B", torch.empty(base.out_features, 0, **factory))
        self.merged = False
        self.past_dropout = False  # True: the frozen stack's input gets its own dropout mask too (O-LoRA's code)
        self.slot_enabled = True  # False drops the slot's term for this forward (CoTo's layer deactivation)
        self.active_rank = rank  # a federated client of lower rank uses the slot's first components only
        # A method's learned scales (SD-LoRA's magnitudes), which live outside the layer: when set, each forward
        # takes the slot's and the stack's B from it, every scale folded in (the slot's alpha/rank too), so the
        # scales get gradients; the layer's own past_B and scale stay what merge, freeze and export read.
        self.up_projections: Callable[[], tuple[Tensor, Tensor]] | None = None
        self.reset_slot()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def past_rank(self) -> int:
        return self.past_A.shape[0]

    @torch.no_grad()
    def reset_slot(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: Kaiming-uniform ``A`` (a = sqrt(5)), zero ``B``, so the slot starts as a no-op."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
        uniform_from_cpu_(self.lora_A, bound, generator)
        self.lora_B.zero_()

    def slot_delta(self) -> Tensor:
        """``s * B A``: the trainable slot's dense weight update."""
        return self.scale * (self.lora_B @ self.lora_A)

    def past_delta(self) -> Tensor:
        """``B_past A_past``: the frozen stack's dense weight update (scales already folded in)."""
        return self.past_B @ self.past_A

    @torch.no_grad()
    def freeze_slot(self) -> None:
        """Append the slot to the frozen stack (scale folded into ``B``).

        The slot itself is left as is, so until :meth:`reset_slot` (or new values) replaces it the adapter
        counts twice; ``freeze_slot()`` followed by ``reset_slot()`` leaves the layer's output unchanged."""
        self._unmerged_only("freeze_slot")
        self.past_A = torch.cat([self.past_A, self.lora_A.detach().clone()], dim=0)
        self.past_B = torch.cat([self.past_B, self.scale * self.lora_B.detach()], dim=1)

    @torch.no_grad()
    def absorb(self, a: Tensor, b: Tensor) -> None:
        """Add the update ``b @ a`` (scale already in ``b``) to the frozen stack, as FLoRA merges its stacked
        clients. A stack wider than the layer is recompressed to rank ``min(in, out)``, exactly."""
        self._unmerged_only("absorb")
        past_A = torch.cat([self.past_A, a.to(self.past_A)], dim=0)
        past_B = torch.cat([self.past_B, b.to(self.past_B)], dim=1)
        self.past_A, self.past_B = compress_factors(past_A, past_B)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the stack and the slot into the base weight, for inference at the base layer's cost."""
        self._unmerged_only("merge")
        self.base_layer.weight += (self.past_delta() + self.slot_delta()).to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to floating-point rounding of one add and one subtract)."""
        if not self.merged:
            raise RuntimeError("unmerge() called on a LoRA layer that is not merged")
        self.base_layer.weight -= (self.past_delta() + self.slot_delta()).to(self.base_layer.weight.dtype)
        self.merged = False

    def _unmerged_only(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"{what}() needs an unmerged layer: call unmerge() first")

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + s * dropout(x) A^T B^T`` (if the slot is enabled) ``+ x A_past^T B_past^T``, through
        :func:`plan.kernels.stacked_lora_linear` on the path ``self.kernel`` selects; the torch path runs exactly
        these operations in this order. With ``past_dropout`` the stack's input is ``dropout(x)`` with a mask of
        its own, drawn after the slot's, as in O-LoRA's official code (one dropout module called twice). With
        ``up_projections`` set, ``B`` and ``B_past`` come from it, scales folded in, and ``s`` is 1."""
        if self.merged:
            return self.base_layer(x)
        slot, r = self.slot_enabled, self.active_rank
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        own_past_mask = self.past_dropout and p > 0 and self.dropout.training and self.past_rank > 0
        lora_B: Tensor = self.lora_B
        past_B, scale = self.past_B, self.scale
        if self.up_projections is not None:
            lora_B, past_B = self.up_projections()
            scale = 1.0
        y = stacked_lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            (self.lora_A if r == self.rank else self.lora_A[:r]) if slot else None,
            (lora_B if r == self.rank else lora_B[:, :r].contiguous()) if slot else None,
            scale,
            None if own_past_mask else self.past_A,
            None if own_past_mask else past_B,
            dropout=p,
            training=self.dropout.training,
            kernel=self.kernel,
        )
        if own_past_mask:
            y = y + self.dropout(x) @ self.past_A.T @ past_B.T
        return y

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The frozen stack grows task by task: take the stored size instead of refusing the mismatch.
        for name in ("past_A", "past_B"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.empty_like(stored, device=self.lora_A.device, dtype=self.lora_A.dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scale={self.scale:g}, past_rank={self.past_rank}, merged={self.merged}, "
            f"kernel={self.kernel}"
        )


@torch.no_grad()
def uniform_from_cpu_(tensor: Tensor, bound: float, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``tensor`` with U(-bound, bound) drawn on the CPU, so one CPU generator serves every device."""
    return tensor.copy_(torch.empty(tensor.shape).uniform_(-bound, bound, generator=generator))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT's ``target_modules`` rule: a name matches a pattern equal to it or to its last dotted parts,
    and a pattern containing regex characters must match the whole name."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        if any(c in pattern for c in "*^$[]()|?+\\") and re.fullmatch(pattern, name):
            return True
    return False


DEFAULT_TARGETS = ["query", "value"]  # for a model type PEFT has no default for (ViT, a custom encoder)


def default_target_modules(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's ``config.model_type``, else :data:`DEFAULT_TARGETS`."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return list(PEFT_TARGETS.get(model_type, DEFAULT_TARGETS))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D``: GPT-2's projections, a linear map with its weight kept
    transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or a ``Conv1D`` rebuilt as the linear layer it computes."""
    if is_conv1d(module):
        weight, bias = cast(Tensor, module.weight), cast(Tensor, module.bias)  # weight: (in, out)
        linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            linear.bias.copy_(bias)
        return linear
    assert isinstance(module, nn.Linear)  # inject_lora passes linear layers and Conv1D only
    return module


def inject_lora(model: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Replace every ``nn.Linear`` (or GPT-2 ``Conv1D``) whose name matches ``config.target_modules`` with a
    :class:`LoRALinear`.

    Freezes every parameter of ``model`` first, so only the LoRA slots (and whatever the caller unfreezes
    afterwards) train. Returns the new layers by module name.
    """
    if isinstance(config.target_modules, str):
        config.target_modules = [config.target_modules]
    patterns = config.target_modules or default_target_modules(model)
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    targets = [name for name in candidates if _matches(name, patterns)]
    if not targets:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ConfigError(
            f"target_modules {patterns} match no nn.Linear in {type(model).__name__}; "
            f"its linear layers end in: {suffixes}"
        )
    linears = {name: as_linear(candidates[name]) for name in targets}
    # Build every layer before swapping any in, so a rank that does not fit leaves no half-injected model.
    layers = {
        name: LoRALinear(linears[name], config.rank, config.alpha, config.dropout, name=name, kernel=config.kernel)
        for name in targets
    }
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every LoRA tensor of ``model`` (slot and frozen stack), keyed as in ``model.state_dict()``."""
    state = {}
    for name, layer in lora_layers(model).items():
        for key in ("lora_A", "lora_B", "past_A", "past_B"):
            state[f"{name}.{key}"] = getattr(layer, key).detach()
    return state


def save_adapters(model: nn.Module, path: str | Path) -> None:
    """Write the LoRA tensors of ``model`` to a safetensors file."""
    save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}, str(path))


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load a file written by :func:`save_adapters` into a model with the same LoRA layers."""
    state = load_file(str(path))
    layers = lora_layers(model)
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(
            f"adapter file {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, layer in layers.items():
        layer.load_state_dict({k: state[f"{name}.{k}"] for k in ("lora_A", "lora_B", "past_A", "past_B")}, strict=False)


def export_peft(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    prefix: str = "base_model.model.",
    task_type: str | None = None,
) -> Path:
    """Write the current adapters (frozen stack and slot together) as one PEFT LoRA adapter.

    Each layer's stack and slot are concatenated into one rank ``past_rank + rank`` adapter with every scale
    folded into ``B``; ``rank_pattern``/``alpha_pattern`` set alpha equal to that rank per layer so PEFT's
    scale ``alpha / r`` is 1 and ``PeftModel.from_pretrained`` reproduces this model's output.

    ``model`` is the adapted base model, or a plan LightningModule, whose ``backbone`` is then exported with
    the backbone's name or folder as ``base_model_name_or_path`` (unless given). ``task_type`` is PEFT's
    (``CAUSAL_LM`` makes ``PeftModel.from_pretrained`` wrap a causal LM as such; None: the bare model).
    """
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        hparams = getattr(model, "hparams", {})
        if (
            base_model_name_or_path is None
            and isinstance(hparams.get("backbone"), str)
            and not hparams.get("backbone_config")
        ):
            base_model_name_or_path = resolve_model_path(hparams["backbone"])
        model = backbone
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRA layers")
    tensors, ranks = {}, {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"export_peft: layer '{name}' is merged; unmerge() it first")
        a = torch.cat([layer.past_A, layer.lora_A.detach()], dim=0)
        b = torch.cat([layer.past_B, layer.scale * layer.lora_B.detach()], dim=1)
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = a.shape[0]
    first = next(iter(ranks.values()))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first,
        "lora_alpha": first,
        "lora_dropout": 0.0,
        "target_modules": sorted(layers),
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in ranks.items() if r != first},
        "alpha_pattern": {f"^{re.escape(n)}$": r for n, r in ranks.items() if r != first},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "export_peft",
    "inject_lora",
    "load_adapters",
    "lora_layers",
    "save_adapters",
]
