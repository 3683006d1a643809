"""The LightningModules: backbone + LoRA + loss, and nothing method-specific.

:class:`AdaptedModule` holds what every model shares; :class:`ContinualClassifier` adds a classification head
and :class:`plan.language_model.ContinualLM` a causal language model that answers instructions. Methods live
in callbacks and reach either through three things: :attr:`~AdaptedModule.lora_layers`,
:meth:`~AdaptedModule.register_loss_term`, and the task events fired by :class:`plan.callbacks.TaskSequencer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from plan.datamodules.continual import TaskLayout
from plan.datamodules.encoding import TAGS
from plan.errors import ConfigError, require
from plan.lora import LoRAConfig, LoRALinear, inject_lora, uniform_from_cpu_
from plan.models import EMBEDDED_MINILM, Encoder, check_vocabulary, hidden_size, load_backbone
from plan.sharding import is_sharding, require_supported_strategy, shard_backbone

LORA_KEYS = ("lora_A", "lora_B", "past_A", "past_B")
NON_INPUT_KEYS = ("labels", *TAGS)  # batch entries that are not model inputs


class AdaptedModule(pl.LightningModule):
    """What every plan model shares: a pretrained backbone with LoRA layers, the surface method callbacks use
    (:attr:`lora_layers`, :meth:`register_loss_term`, :meth:`head_parameters`), per-task scores that fill the
    accuracy matrix, AdamW over the slots (and the head, if any), and checkpoints that hold adapters only.

    Subclasses build the backbone, say how a batch is scored (``_evaluate``) and how a task's scores are
    accumulated (``task_metric``), and compute the training loss (``task_loss``)."""

    default_tokenizer = EMBEDDED_MINILM  # the data's tokenizer for a backbone built from a config
    generative = False  # whether the data is served as instructions (plan.datamodules.encoding)
    peft_task_type: str | None = None  # PEFT's task_type for an exported adapter (plan.export); None: the bare model

    def __init__(self, backbone: nn.Module, lora: LoRAConfig, lr: float, weight_decay: float) -> None:
        super().__init__()
        require(lr > 0, f"model.lr must be > 0 (AdamW's step size for the LoRA slots), got {lr}")
        require(weight_decay >= 0, f"model.weight_decay must be >= 0 (AdamW's decoupled decay), got {weight_decay}")
        self.lora_config = lora
        self.backbone = backbone.train()  # from_pretrained returns eval mode
        self._lora_layers = inject_lora(self.backbone, self.lora_config)
        self.lr, self.weight_decay = lr, weight_decay
        self.task_metrics: nn.ModuleList
        self.layout: TaskLayout = None  # set by configure_layout
        self.task_accuracy: dict[int, float] = {}
        self.loss_terms: dict[str, Callable[[], Tensor]] = {}
        self.method_parameters = nn.ParameterDict()  # a method's own trained tensors (SD-LoRA's magnitudes)

    @property
    def tokenizer_source(self) -> str:
        """Where the data's tokenizer comes from unless the datamodule names one: the pretrained backbone's
        folder or hub name; the default tokenizer for a backbone built from a config or given as a module."""
        backbone = self.hparams.backbone
        return (
            backbone if isinstance(backbone, str) and self.hparams.backbone_config is None else self.default_tokenizer
        )

    # -- the surface callbacks use ------------------------------------------------------------------------

    @property
    def lora_layers(self) -> dict[str, LoRALinear]:
        return self._lora_layers

    def register_loss_term(self, name: str, term: Callable[[], Tensor]) -> None:
        """Add ``term()`` to every training loss (logged as ``train/<name>``); a method callback's regulariser."""
        self.loss_terms[name] = term

    def add_method_parameter(self, name: str, value: Tensor) -> nn.Parameter:
        """Train ``value`` beside the slots (same group, learning rate and decay) and keep it in checkpoints: a
        method's own parameter, such as SD-LoRA's magnitudes. Call it before the optimizer is built (a callback's
        ``setup``); a second call with the same name and shape returns the existing parameter."""
        existing = self.method_parameters.get(name)
        if existing is None or existing.shape != value.shape:
            self.method_parameters[name] = nn.Parameter(value.to(self.device))
        return self.method_parameters[name]

    def slot_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self._lora_layers.values() for p in (layer.lora_A, layer.lora_B)]

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """Trained parameters outside the LoRA slots, by name (a classifier's head; none for a language model):
        federated rounds average them beside the adapters."""
        return {}

    # -- layout -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.layout is None:
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "layout"):
                raise ConfigError(
                    f"{type(self).__name__} needs a plan datamodule (plan.datamodules.TaskSequenceDataModule or "
                    "FederatedDataModule)"
                )
            datamodule.setup(stage)
            self.check_layout(datamodule.layout, datamodule.joint)
            self.configure_layout(datamodule.layout)
            check_vocabulary(self.backbone, datamodule.tokenizer, str(self.hparams.backbone), datamodule.tokenizer_name)

    def check_layout(self, layout: TaskLayout, joint: bool) -> None:
        """Refuse a task layout this model cannot learn from (nothing to refuse by default)."""

    def configure_layout(self, layout: TaskLayout) -> None:
        """Create the per-task score accumulators for a task layout."""
        self.layout = layout
        self.task_metrics = nn.ModuleList(self.task_metric(task) for task in range(layout.num_tasks))

    def task_metric(self, task: int) -> Metric:
        raise NotImplementedError

    def _tasks_seen(self) -> int:
        return self.trainer.datamodule.seen_now()

    # -- steps ----------------------------------------------------------------------------------------------

    def task_loss(self, batch: dict) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.task_loss(batch)
        self.log("train/ce", loss, prog_bar=True)
        for name, term in self.loss_terms.items():
            value = term()
            self.log(f"train/{name}", value)
            loss = loss + value
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch: dict, task: int, seen: int) -> None:
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self._tasks_seen())

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, self._tasks_seen())

    def on_validation_epoch_end(self) -> None:
        self._collect_accuracy("val", len(self.trainer.val_dataloaders))

    def on_test_epoch_end(self) -> None:
        self._collect_accuracy("test", len(self.trainer.test_dataloaders))

    def _collect_accuracy(self, split: str, count: int) -> None:
        self.task_accuracy = self._compute_accuracy(count)
        for task, accuracy in self.task_accuracy.items():
            self.log(f"{split}/acc_task_{task}", accuracy, add_dataloader_idx=False)
        self.log(f"{split}/acc", sum(self.task_accuracy.values()) / count, prog_bar=True, add_dataloader_idx=False)

    def _compute_accuracy(self, count: int) -> dict[int, float]:
        """Per-task score, summed over ranks by torchmetrics, then reset for the next evaluation."""
        accuracy = {}
        for task in range(count):
            metric: Metric = self.task_metrics[task]  # type: ignore[assignment]
            accuracy[task] = metric.compute().item()
            metric.reset()
        return accuracy

    @torch.no_grad()
    def untrained_accuracy(self) -> dict[int, float]:
        """Score on every task before any training: the baseline of forward transfer."""
        was_training = self.training
        self.eval()
        loaders = self.trainer.datamodule.task_eval_loaders(self.layout.num_tasks)
        for task, loader in enumerate(loaders):
            for batch in loader:
                self._evaluate(self.transfer_batch_to_device(batch, self.device, 0), task, self.layout.num_tasks)
        self.train(was_training)
        return self._compute_accuracy(len(loaders))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Every slot parameter is registered, frozen or not, so a callback may freeze or thaw A or B later.
        groups: list[dict] = [{"params": self.slot_parameters() + list(self.method_parameters.values()), "lr": self.lr}]
        if self.head_parameters():
            groups.append({"params": list(self.head_parameters().values()), "lr": self.head_lr})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    @property
    def head_lr(self) -> float:
        return self.lr

    # -- sharding -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Under :class:`plan.sharding.FSDP2Strategy`, shard the frozen backbone block by block over the
        data-parallel processes, keeping the LoRA slots (and the head, outside the backbone) whole and replicated,
        so that method callbacks read and write them as under any other strategy. Other strategies keep the model
        whole; a sharding strategy plan cannot train with is refused."""
        if self._trainer is None:  # load_from_checkpoint builds the model outside any run: nothing to shard
            return
        strategy = self.trainer.strategy
        require_supported_strategy(strategy)
        if is_sharding(strategy):
            backbone = self.hparams.get("backbone")
            named = isinstance(backbone, str) and self.hparams.get("backbone_config") is None
            name = repr(backbone) if named else "(built from backbone_config or given as a module)"
            adapters = {  # the slots, frozen or not, and whatever else a LoRA layer holds beside its base layer
                p
                for layer in self._lora_layers.values()
                for key, p in layer.named_parameters()
                if not key.startswith("base_layer.")
            }
            shard_backbone(self.backbone, self.device_mesh["data_parallel"], adapters, name)

    # -- checkpoints: adapters and head only --------------------------------------------------------------

    def _frozen_keys(self, state: dict) -> list[str]:
        return [k for k in state if k.startswith("backbone.") and not k.endswith(LORA_KEYS)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave the frozen backbone weights out (it is reloaded from ``backbone``), and keep the task layout,
        which sizes the head and names the tasks' metrics, so that ``load_from_checkpoint`` needs no datamodule."""
        state = checkpoint["state_dict"]
        for key in self._frozen_keys(state):
            del state[key]
        checkpoint["task_layout"] = asdict(self.layout)
        checkpoint["plan_model"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.layout is None and "task_layout" in checkpoint:
            self.configure_layout(TaskLayout(**checkpoint["task_layout"]))
        state, own = checkpoint["state_dict"], self.state_dict()
        for key in self._frozen_keys(own):
            state.setdefault(key, own[key])
        for key, value in state.items():  # a method's parameters, for a model loaded without its callback (export)
            name = key.removeprefix("method_parameters.")
            if name != key and name not in self.method_parameters:
                self.method_parameters[name] = nn.Parameter(torch.empty_like(value, device=self.device))


class ContinualClassifier(AdaptedModule):
    """A LoRA-adapted encoder with one linear head over every class of the task sequence.

    Logits are masked by scenario: training sees the current task's classes (``train_classes='current'``, as
    InfLoRA and O-LoRA train) or every class seen so far (``'seen'``); class-incremental evaluation ranks all
    classes seen so far, task-incremental evaluation only the evaluated task's, domain-incremental all of them.

    Args:
        backbone: Hugging Face model name or path, ``embedded:all-MiniLM-L6-v2``, or an encoder module.
        backbone_config: build a randomly initialised backbone from this config instead (tests, ablations).
        lora: rank, alpha, dropout and target modules of the adapters.
        pooling: ``mean`` over non-padding tokens, ``cls`` (first token), or ``auto`` (mean for text, cls else).
        lr, head_lr, weight_decay: AdamW settings for the LoRA slots and the head.
        num_classes: head size; by default the datamodule's task layout decides it at setup.
    """

    def __init__(
        self,
        backbone: str | Encoder = EMBEDDED_MINILM,
        backbone_config: dict | None = None,
        lora: LoRAConfig | None = None,
        pooling: str = "auto",
        train_classes: str = "current",
        lr: float = 1e-3,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        require(pooling in ("auto", "mean", "cls"), f"model.pooling must be 'auto', 'mean' or 'cls', got {pooling!r}")
        require(
            train_classes in ("current", "seen"),
            f"model.train_classes must be 'current' or 'seen', got {train_classes!r}",
        )
        require(head_lr is None or head_lr > 0, f"model.head_lr must be > 0, or null to use lr, got {head_lr}")
        super().__init__(load_backbone(backbone, backbone_config), lora or LoRAConfig(), lr, weight_decay)
        self.save_hyperparameters()
        self.pooling = pooling
        self.train_classes = train_classes
        self._head_lr = head_lr or lr
        self.head: nn.Linear  # created by configure_layout, once the task layout is known

    @property
    def head_lr(self) -> float:
        return self._head_lr

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.head.named_parameters())

    def check_layout(self, layout: TaskLayout, joint: bool) -> None:
        """Refuse tasks that this model cannot learn from: with ``train_classes='current'`` a task of one class
        is ranked against itself alone, so its loss is exactly 0."""
        if joint or self.train_classes != "current":
            return
        single = [name for name, ids in zip(layout.task_names, layout.task_classes) if len(ids) < 2]
        require(
            not single,
            f"model.train_classes='current' trains each task on its own classes only, but tasks {single} have one "
            "class, so their loss is exactly 0; use train_classes: seen, or at least 2 classes per task",
        )

    def configure_layout(self, layout: TaskLayout) -> None:
        """Create the head and the per-task accuracy metrics for a task layout."""
        super().configure_layout(layout)
        self.head = nn.Linear(hidden_size(self.backbone), layout.num_classes, device=self.device)
        # nn.Linear's own init, drawn from the run's seed rather than the global RNG stream, whose position
        # at setup time depends on the strategy (DDP launches consume random numbers a single process does not).
        generator = torch.Generator().manual_seed(torch.initial_seed())
        bound = 1.0 / hidden_size(self.backbone) ** 0.5
        for tensor in (self.head.weight, self.head.bias):
            uniform_from_cpu_(tensor, bound, generator)

    def task_metric(self, task: int) -> Metric:
        return MulticlassAccuracy(self.layout.num_classes, average="micro")

    def _class_mask(self, classes: list[int]) -> Tensor:
        mask = torch.zeros(self.layout.num_classes, dtype=torch.bool, device=self.device)
        mask[classes] = True
        return mask

    def train_mask(self) -> Tensor:
        seen = self._tasks_seen()
        tasks = range(seen) if self.train_classes == "seen" or self.trainer.datamodule.joint else [seen - 1]
        return self._class_mask([c for t in tasks for c in self.layout.task_classes[t]])

    def eval_mask(self, task: int, seen: int) -> Tensor:
        """Classes ranked when evaluating ``task`` after ``seen`` tasks have been trained."""
        if self.layout.scenario == "task_incremental":
            return self._class_mask(self.layout.task_classes[task])
        return self.seen_mask(seen)

    def seen_mask(self, seen: int) -> Tensor:
        """Every class of the first ``seen`` tasks."""
        return self._class_mask([c for t in range(seen) for c in self.layout.task_classes[t]])

    # -- forward and steps --------------------------------------------------------------------------------

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
        hidden = self.backbone(**inputs).last_hidden_state
        mask = batch.get("attention_mask")
        if self.pooling == "mean" or (self.pooling == "auto" and mask is not None):
            if mask is None:
                raise ConfigError("model.pooling 'mean' needs an attention mask (text inputs); use 'cls' or 'auto'")
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return hidden[:, 0]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.features(batch))

    def task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch).masked_fill(~self.train_mask(), float("-inf"))
        return F.cross_entropy(logits, batch["labels"])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, list]:
        """The most probable class among those the model has been trained on so far, and its probability."""
        probabilities = self(batch).masked_fill(~self.seen_mask(self._tasks_seen()), float("-inf")).softmax(-1)
        score, predicted = probabilities.max(-1)
        names = self.layout.class_names
        return {
            "index": batch["index"].tolist(),
            "label": [names[c] if c >= 0 else "" for c in batch["labels"].tolist()],
            "predicted": [names[c] for c in predicted.tolist()],
            "score": score.tolist(),
        }

    def _evaluate(self, batch: dict[str, Tensor], task: int, seen: int) -> None:
        logits = self(batch).masked_fill(~self.eval_mask(task, seen), float("-inf"))
        self.task_metrics[task].update(logits.argmax(-1), batch["labels"])  # type: ignore[operator]
