"""SD-LoRA (Wu et al., ICLR 2025): each task's LoRA direction is frozen once learned and only its magnitude keeps
training."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import torch
from torch import Tensor

from plan.callbacks.sequencer import TaskCallback, TaskSequencer
from plan.errors import ConfigError, require
from plan.lora import LoRALinear

PARAMETER = "sdlora_magnitudes"  # the module's method parameter that holds every magnitude


def unit_up_projection(a: Tensor, b: Tensor) -> Tensor:
    """``B / (||B||_F ||A||_F)``: the up-projection of a finished task's normalised direction
    ``B A / (||B||_F ||A||_F)`` (the official code divides by the product of the two norms, not by ``||B A||``).
    A task whose ``B`` never moved keeps a zero direction instead of a NaN one."""
    norm = b.norm() * a.norm()
    return b / norm if norm > 0 else torch.zeros_like(b)


def scaled_stack(units: Tensor, magnitudes: Tensor, rank: int) -> Tensor:
    """``[m_1 U_1 | m_2 U_2 | ...]``: each finished task's unit up-projection block (``rank`` columns) times its
    magnitude, the stack's ``B`` with the magnitudes folded in."""
    return units * magnitudes.to(units).repeat_interleave(rank)


class SDLoRA(TaskCallback):
    """SD-LoRA's layer, as the official code (``WuYichen-97/SD-Lora-CL``, ``backbone/lora.py``) computes it:

        ``y = W x + b + sum_{k<t} m_k B_k A_k x / (||B_k||_F ||A_k||_F) + m_t B_t A_t x``

    Past tasks' directions ``B_k A_k`` are frozen (the stacked sequencer's frozen stack); their magnitudes
    ``m_1..m_{t-1}`` and the current task's ``m_t`` are trained with the slot (``A_t``, ``B_t``). Every magnitude
    restarts at ``init`` (0.8) at every task start, as the official code builds a new network per task. As there,
    the current task's term has no ``alpha / rank`` (its magnitude replaces it) and the past terms no dropout;
    the slot's input gets ``lora.dropout`` (the configs set 0, as the official code has none).

    ``per_layer=False`` (official) shares one magnitude per task across every adapted layer; ``True`` gives each
    layer its own. The magnitudes are the module's method parameter ``sdlora_magnitudes`` (tasks x 1, or tasks x
    layers), so they are in the optimizer, in checkpoints and synchronised by DDP. After every optimizer step and
    at each task end the stack's ``B`` is rewritten with the magnitudes folded in, so merging, the sequencer's
    freeze and ``plan export`` see the model as it is; a checkpoint taken inside a task exports its current slot
    at ``alpha / rank`` instead of its magnitude (the slot's scale is not part of a checkpoint's adapter state).

    Use with ``TaskSequencer(adapters='stacked')``; the stack's magnitudes need gradients, which the fused Triton
    backward does not compute, so the layers take the torch path while a task trains (``lora.kernel: triton`` is
    refused).
    """

    def __init__(self, init: float = 0.8, per_layer: bool = False) -> None:
        require(
            init > 0,
            f"SDLoRA init must be > 0 (the official 0.8), got {init}: 0 gives the new adapter no gradient and a "
            "negative value flips every past direction",
        )
        self.init, self.per_layer = init, per_layer
        self.units: dict[str, Tensor] = {}  # per layer, the finished tasks' unit up-projections side by side
        self.magnitudes: Tensor | None = None
        self.layers: dict[str, LoRALinear] = {}

    # -- set-up -------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sequencers = [cb for cb in trainer.callbacks if isinstance(cb, TaskSequencer)]
        require(
            bool(sequencers) and sequencers[0].adapters == "stacked",
            "SDLoRA needs TaskSequencer(adapters='stacked'): one frozen direction per past task, got "
            + (f"adapters={sequencers[0].adapters!r}" if sequencers else "no TaskSequencer"),
        )
        self.attach(pl_module, trainer.datamodule.num_stages)

    def attach(self, pl_module: pl.LightningModule, num_tasks: int) -> None:
        """Create the magnitudes (one row per task) on ``pl_module``; before the optimizer is built."""
        self.layers = dict(pl_module.lora_layers)
        triton = sorted(name for name, layer in self.layers.items() if layer.kernel == "triton")
        if triton:
            raise ConfigError(
                "lora.kernel='triton' cannot train SD-LoRA's magnitudes (the fused backward computes no gradient for "
                f"the frozen stack; layers {triton[:3]}); use lora.kernel: auto or torch"
            )
        columns = len(self.layers) if self.per_layer else 1
        initial = torch.full((num_tasks, columns), self.init)
        self.magnitudes = pl_module.add_method_parameter(PARAMETER, initial)
        for name, layer in self.layers.items():
            self.units.setdefault(name, torch.zeros(layer.out_features, 0, dtype=layer.lora_B.dtype))

    # -- the layer's scales ---------------------------------------------------------------------------------

    def layer_magnitudes(self, index: int, magnitudes: Tensor | None = None) -> Tensor:
        """Every task's magnitude for the layer at ``index`` (in ``lora_layers`` order), from ``magnitudes`` (by
        default the trained parameter)."""
        if magnitudes is None:
            assert self.magnitudes is not None  # created by attach
            magnitudes = self.magnitudes
        return magnitudes[:, index if self.per_layer else 0]

    def up_projections(self, name: str, index: int, layer: LoRALinear) -> tuple[Tensor, Tensor]:
        """The slot's ``m_t B_t`` and the stack's ``[m_1 U_1 | ...]``, with gradients to the magnitudes."""
        magnitudes = self.layer_magnitudes(index)
        done = self.units[name].shape[1] // layer.rank
        return magnitudes[done].to(layer.lora_B) * layer.lora_B, scaled_stack(
            self.units[name], magnitudes[:done], layer.rank
        )

    @torch.no_grad()
    def fold(self) -> None:
        """Write the magnitudes into the layers' own state: the stack's ``B`` and the slot's scale."""
        assert self.magnitudes is not None  # created by attach
        values = self.magnitudes.detach().cpu()  # one device transfer for every layer's scale
        for index, (name, layer) in enumerate(self.layers.items()):
            magnitudes = self.layer_magnitudes(index, values)
            done = self.units[name].shape[1] // layer.rank
            layer.past_B = scaled_stack(self.units[name], magnitudes[:done], layer.rank).to(layer.past_B)
            layer.scale = float(magnitudes[done])

    def _start(self) -> None:
        """Route every layer's forward through the magnitudes (units on the layers' device)."""
        for index, (name, layer) in enumerate(self.layers.items()):
            self.units[name] = self.units[name].to(layer.lora_B)
            if self.units[name].shape[1] != layer.past_rank:
                raise ValueError(
                    f"SDLoRA: layer '{name}' has a stack of rank {layer.past_rank}, but SD-LoRA recorded "
                    f"{self.units[name].shape[1]} columns of past directions; another callback changed the stack"
                )
            layer.up_projections = partial(self.up_projections, name, index, layer)

    # -- task events ----------------------------------------------------------------------------------------

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        assert self.magnitudes is not None  # created at setup
        with torch.no_grad():
            self.magnitudes.fill_(self.init)
        self._start()

    def on_task_resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self._start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.fold()

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        """Fold the magnitudes (so the sequencer's freeze appends ``m_t B_t``: the model as last evaluated), keep
        the task's unit direction, and hand the layers back their own forward until the next task starts."""
        self.fold()
        for name, layer in self.layers.items():
            unit = unit_up_projection(layer.lora_A.detach(), layer.lora_B.detach())
            self.units[name] = torch.cat([self.units[name], unit], dim=1)
            layer.up_projections = None

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"units": self.units}

    def load_state_dict(self, state_dict: dict) -> None:
        self.units = dict(state_dict["units"])
