"""Sharded training (FSDP2): the frozen backbone split over the processes, the adapters and head replicated.

The backbone is what is big, so it is what is sharded: every transformer block becomes one FSDP2 group
(``torch.distributed.fsdp.fully_shard``), whose weights are gathered for its forward and backward passes and
freed after. What trains stays out of sharding (``ignored_params``): the LoRA slots, the frozen stacks (buffers)
and the head remain plain tensors, replicated on every rank as under DDP. That choice keeps every method callback
unchanged (FederatedRounds loads global adapters into the slots, InfLoRA and PLAN write ``A``, projections edit
``A`` after each step: all in place, on ordinary tensors), keeps checkpoints adapter-only single files that
``plan export`` and resume read as they read a DDP run's, and costs two small pieces of code here: the blocks to
shard are found with the model's ``_no_split_modules`` (as accelerate's ``device_map`` does), and the replicated
parameters' gradients are averaged over ranks after each backward pass, which DDP would do and
``ModelParallelStrategy`` does not. The alternative, DTensor-aware callbacks, would touch every method.

Select it with ``trainer.strategy: fsdp2`` (or ``class_path: plan.sharding.FSDP2Strategy``); with
``precision: bf16-mixed`` the sharded fp32 weights are computed in bf16 under autocast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from plan.errors import ConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh

STRATEGY_NAME = "fsdp2"
VALID_STRATEGIES = (
    f"'{STRATEGY_NAME}' (plan.sharding.FSDP2Strategy: the backbone sharded with FSDP2, adapters and head "
    "replicated), 'ddp', or one device"
)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every process data-parallel, the replicated parameters' gradients averaged,
    and plan's adapter-only checkpoints read and written as single files (see the module docstring for why).

    ``AdaptedModule.configure_model`` shards the backbone on this strategy's data-parallel mesh. Ranks average
    the replicated gradients unless the datamodule shards federated clients over them, where each rank trains its
    own client and the round-end aggregation is the only exchange (as ``FederatedRounds`` does for DDP).
    """

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.average_gradients = True

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process data-parallel
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        self.average_gradients = not hasattr(trainer.datamodule, "sampled_clients")
        super().setup(trainer)

    def post_backward(self, closure_loss: Tensor) -> None:
        if self.average_gradients and self.world_size > 1:
            assert self.lightning_module is not None
            average_gradients(replicated_parameters(self.lightning_module), self.world_size)

    def process_dataloader(self, dataloader: object) -> object:
        """Refuse, rather than hang on, loaders whose length differs between ranks: sharded ranks run every
        forward pass together (plan's loaders are equally long as long as each rank gets an example)."""
        if self.world_size > 1 and hasattr(dataloader, "__len__"):
            lengths: list[int | None] = [None] * self.world_size
            dist.all_gather_object(lengths, len(dataloader))
            if len(set(lengths)) > 1:
                raise ConfigError(
                    f"trainer.strategy fsdp2: a data loader has {lengths} batches on the {self.world_size} processes; "
                    "sharded processes run every forward pass together, so each needs a share of every set it reads: "
                    "use at most as many processes as the smallest task's evaluation examples (and as a method's "
                    "max_examples, the examples its statistics pass reads), or more examples"
                )
        return dataloader

    # -- checkpoints: what a DDP run saves, since only replicated tensors are trained ---------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The rank's own state: the sharded backbone weights appear as shards (no gathering), and
        ``AdaptedModule.on_save_checkpoint`` drops them with the rest of the frozen backbone."""
        assert self.lightning_module is not None
        return self.lightning_module.state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return Strategy.optimizer_state(self, optimizer)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)


StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy, description="plan: backbone sharded with FSDP2")


def replicated_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that are not sharded: LoRA slots and head."""
    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter], world_size: int) -> None:
    """Replace every gradient with its mean over the ranks: one all-reduce per dtype, summed and divided (gloo
    has no average). Every rank must pass the same parameters with gradients, in the same order."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: a sharded one (a frozen backbone weight outside its block's forward pass) gathered
    from every rank, so all ranks must ask together; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def strategy_name(strategy: Any) -> str:
    """How a configured ``trainer.strategy`` reads in an error: its name or its class path."""
    if isinstance(strategy, str):
        return repr(strategy)
    path = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else None)
    return str(path) if path else type(strategy).__name__


def require_supported_strategy(strategy: Any) -> None:
    """Refuse a sharding strategy plan cannot train with, before any process starts: Lightning's FSDP1 flattens
    the LoRA slots into sharded flat parameters that callbacks cannot write, and a plain ``ModelParallelStrategy``
    writes distributed checkpoint folders and may shard over tensor-parallel dimensions. ``strategy`` is the
    configured value: a name, a ``class_path`` mapping, or a strategy object."""
    if isinstance(strategy, str):
        kind = strategy.split("_", 1)[0]
        unsupported = kind == "fsdp"
    elif isinstance(strategy, Strategy):
        unsupported = isinstance(strategy, FSDPStrategy) or (
            isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy, FSDP2Strategy)
        )
    else:
        path = strategy_name(strategy)
        unsupported = path.rsplit(".", 1)[-1] in ("FSDPStrategy", "ModelParallelStrategy")
    if unsupported:
        raise ConfigError(
            f"trainer.strategy {strategy_name(strategy)} cannot shard plan's models: Lightning's FSDP strategy "
            "wraps the LoRA slots into flat sharded parameters that method callbacks cannot write, and a plain "
            "ModelParallelStrategy writes distributed checkpoint folders instead of plan's adapter-only files; "
            f"valid: {VALID_STRATEGIES}"
        )


def transformer_blocks(backbone: nn.Module, name: str) -> list[nn.Module]:
    """The backbone's repeated blocks, to shard one by one: the modules whose class the model lists in
    ``_no_split_modules`` (what accelerate keeps on one device), deepest first. ``name`` names the backbone in
    the error raised when it lists none."""
    classes = set(getattr(backbone, "_no_split_modules", None) or ())
    blocks = [module for module in backbone.modules() if type(module).__name__ in classes]
    if not blocks:
        raise ConfigError(
            f"model.backbone {name} ({type(backbone).__name__}) cannot be sharded: no module of it is a transformer "
            f"block it lists in _no_split_modules (it lists {sorted(classes)}); FSDP2 needs a Hugging Face model "
            "that lists its blocks, such as BERT "
            "(BertLayer), ViT (ViTLayer), Llama (LlamaDecoderLayer), Qwen2 or GPT-2; or use trainer.strategy ddp"
        )
    return blocks[::-1]


def shard_backbone(backbone: nn.Module, mesh: DeviceMesh, keep: set[nn.Parameter], name: str) -> None:
    """Shard every transformer block of ``backbone``, then the rest of it, over ``mesh``; the parameters in
    ``keep`` (LoRA slots) stay whole. Does nothing to a backbone already sharded (Lightning calls
    ``configure_model`` again for every ``fit``, ``validate`` or ``test`` in one process)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(backbone, FSDPModule):
        return
    blocks = transformer_blocks(backbone, name)
    kinds = ", ".join(sorted({type(block).__name__ for block in blocks}))
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep)
    fully_shard(backbone, mesh=mesh, ignored_params=keep)
    rank_zero_info(f"plan: backbone sharded over {mesh.size()} processes: {len(blocks)} blocks ({kinds}) and the rest")


def is_sharding(strategy: Strategy) -> bool:
    return isinstance(strategy, FSDP2Strategy)


__all__ = ["FSDP2Strategy", "require_supported_strategy", "shard_backbone", "transformer_blocks"]
