"""Task sequences for continual learning: one training epoch is one task.

The datamodule splits a source into tasks (by classes for class- and task-incremental learning, by domains
for domain-incremental learning), serves the current task's training data for as many passes as the task asks,
and validates on every task seen so far, one dataloader each, so each epoch end yields one row of the accuracy
matrix. It shards batches across ranks itself (``use_distributed_sampler=False``) so that a DDP run sees the
same global batches as a single process.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from plan.datamodules.encoding import (
    EncodedExamples,
    InstructionExamples,
    InstructionFormat,
    collate_fn,
    encode_split,
    encode_texts,
    instruction_format_for,
)
from plan.datamodules.sources import DatasetSequence, DataSource, Examples
from plan.errors import require
from plan.models import EMBEDDED_MINILM, load_tokenizer

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental")
PREDICT_SPLITS = ("train", "test")


@dataclass
class TaskLayout:
    """Which global class ids each task holds, and how evaluation restricts the head."""

    scenario: str
    class_names: list[str]
    task_classes: list[list[int]]
    task_names: list[str] = field(default_factory=list)
    metrics: list[str] | None = None  # for a language model: how each task's generated answers are scored

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def class_incremental_layout(
    classes: list[str], scenario: str, classes_per_task: int | None, tasks: list[list[str]] | None, order_seed: int
) -> TaskLayout:
    """Tasks of disjoint classes: explicit ``tasks`` (class names), or a seeded class order cut every
    ``classes_per_task``. Global class ids follow the task order, so task t owns a contiguous id range."""
    known = set(classes)
    if tasks is not None:
        unknown = sorted({c for task in tasks for c in task} - known)
        require(not unknown, f"tasks name unknown classes {unknown}; the data has classes {sorted(known)}")
        empty = [t for t, task in enumerate(tasks) if not task]
        require(not empty, f"tasks: task(s) {empty} list no classes; every task needs at least one class")
        flat = [c for task in tasks for c in task]
        repeated = sorted({c for c in flat if flat.count(c) > 1})
        require(not repeated, f"tasks repeat classes across tasks: {repeated}; each class belongs to one task")
        order, sizes = flat, [len(task) for task in tasks]
    else:
        divisors = [k for k in range(1, len(classes) + 1) if len(classes) % k == 0]
        require(
            classes_per_task in divisors,
            f"classes_per_task={classes_per_task} must cut the {len(classes)} classes into equal tasks: one of "
            f"{divisors} (or give 'tasks' as lists of class names)",
        )
        order = sorted(classes)
        random.Random(order_seed).shuffle(order)
        assert classes_per_task is not None  # one of the divisors
        sizes = [classes_per_task] * (len(classes) // classes_per_task)
    task_classes, start = [], 0
    for size in sizes:
        task_classes.append(list(range(start, start + size)))
        start += size
    layout = TaskLayout(scenario, order, task_classes, [f"task_{t}" for t in range(len(sizes))])
    single = [name for name, ids in zip(layout.task_names, task_classes) if len(ids) == 1]
    if scenario == "task_incremental" and single:
        rank_zero_warn(
            f"task_incremental with one-class tasks {single}: evaluating such a task ranks its one class alone, "
            "so its accuracy is 1.0 whatever the model learned"
        )
    return layout


def domain_incremental_layout(classes: list[str], domains: list[str], order: list[str] | None) -> TaskLayout:
    """One task per domain over one shared label space."""
    if order is not None:
        unknown = sorted(set(order) - set(domains))
        require(not unknown, f"domains names unknown domains {unknown}; the data has domains {sorted(set(domains))}")
        repeated = sorted({d for d in order if order.count(d) > 1})
        require(not repeated, f"domains repeats {repeated}; each domain is one task")
    names = list(order) if order is not None else sorted(set(domains))
    all_ids = list(range(len(classes)))
    return TaskLayout("domain_incremental", sorted(classes), [all_ids for _ in names], names)


def load_splits(source: DataSource) -> tuple[Examples, Examples]:
    """The source's train and test splits. An empty split, or test classes the training split lacks (the model
    could never predict them), is an error naming the source; classes with no test example only warn."""
    train, test = source.load("train"), source.load("test")
    for name, split in (("train", train), ("test", test)):
        require(len(split) > 0, f"source {source.describe()} gave an empty {name} split")
    test_only = sorted(set(test.labels) - set(train.labels))
    require(
        not test_only,
        f"the test split of {source.describe()} has classes the training split lacks: {test_only}; "
        "the model can never predict them: add training examples of them or drop them from the test split",
    )
    untested = sorted(set(train.labels) - set(test.labels))
    if untested:
        rank_zero_warn(f"classes {untested} have no test examples in {source.describe()}: nothing measures them")
    return train, test


def free_text_tasks(examples: Examples, layout: TaskLayout) -> list[bool]:
    """Which tasks answer in free text: those whose classes hold an example with its own response."""
    if examples.responses is None:
        return [False] * layout.num_tasks
    class_id = {name: i for i, name in enumerate(layout.class_names)}
    texts = {
        class_id[label] for label, r in zip(examples.labels, examples.responses) if r is not None and label in class_id
    }
    return [any(c in texts for c in classes) for classes in layout.task_classes]


def check_loader_settings(batch_size: int, eval_batch_size: int | None, max_length: int, num_workers: int) -> None:
    """Refuse loader settings that would fail later with an error naming none of them (a batch size of 0 is
    range()'s 'arg 3 must not be zero' in the middle of fit)."""
    for key, value, least, meaning in (
        ("batch_size", batch_size, 1, "examples per batch"),
        ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size, 1, "examples per batch, or null"),
        ("max_length", max_length, 1, "tokens per text"),
        ("num_workers", num_workers, 0, "loader processes, 0 = load in the main process"),
    ):
        require(value >= least, f"{key} must be >= {least} ({meaning}), got {value}")


def tokenizer_name_for(requested: str | None, trainer: pl.Trainer | None) -> str:
    """``requested``, else the tokenizer of the model being trained (its ``tokenizer_source``), else the embedded
    MiniLM's: by default the data is encoded with the backbone's own tokenizer."""
    if requested is not None:
        return requested
    model = trainer.lightning_module if trainer is not None else None
    return getattr(model, "tokenizer_source", None) or EMBEDDED_MINILM


def tokenizer_for(examples: Examples, name: str, max_length: int) -> tuple[object | None, int]:
    """The tokenizer text inputs need (None for images) and the id it pads with (its end-of-sequence id if it
    has no padding token, as causal LM tokenizers often do; 0 if it has neither).

    ``max_length`` must leave room for text beside the special tokens: a tokenizer does not refuse one that
    does not, it ignores it (MiniLM's gives whole texts for 1, and only [CLS] [SEP] for 2)."""
    if isinstance(examples.inputs, Tensor):
        return None, 0
    tokenizer = load_tokenizer(name)
    special = tokenizer.num_special_tokens_to_add()
    require(
        max_length > special,
        f"max_length={max_length} leaves no room for text: tokenizer '{name}' adds {special} special tokens to "
        f"every example; use max_length > {special} (e.g. 128)",
    )
    if max_length > tokenizer.model_max_length:
        rank_zero_warn(
            f"max_length={max_length} exceeds the {tokenizer.model_max_length} tokens tokenizer '{name}' is made "
            "for: a backbone with that many positions fails on a longer text"
        )
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return tokenizer, pad_id


def unused_settings(scenario: str, classes_per_task: int | None, tasks: list | None, domains: list | None) -> list[str]:
    """The settings given that ``scenario`` does not read, each with what decides instead."""
    given = {"classes_per_task": classes_per_task, "tasks": tasks, "domains": domains}
    if scenario == "domain_incremental":
        unread = {"classes_per_task": "the tasks are the domains", "tasks": "the tasks are the domains"}
    else:
        unread = {"domains": f"{scenario} tasks are class groups"}
        if tasks is not None:
            unread["classes_per_task"] = "the explicit tasks decide"
    return [f"{key} ({why})" for key, why in unread.items() if given[key] is not None]


def eval_shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of an evaluation set: unpadded, so counts summed over ranks are exact."""
    return indices[rank * len(indices) // world_size : (rank + 1) * len(indices) // world_size]


def eval_batches(indices: list[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches of an evaluation set: its :func:`eval_shard`, cut into as many batches as every other
    rank's, since sharded ranks (FSDP) run each forward pass together. The count is the smallest share's, so the
    last batch of a share one example larger may hold ``batch_size + 1``; one process gets plain chunks."""
    shard = eval_shard(indices, rank, world_size)
    count = max(1, -(-(len(indices) // world_size) // batch_size))
    if not shard:
        return []
    last = (count - 1) * batch_size
    return [shard[start : start + batch_size] for start in range(0, last, batch_size)] + [shard[last:]]


class SkipFirst(Sampler[list]):
    """A batch sampler whose next pass leaves out its first ``skip`` batches (then ``skip`` returns to 0)."""

    def __init__(self, batches: Sampler[list]) -> None:
        self.batches, self.skip = batches, 0

    def __iter__(self) -> Iterator[list]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class ResumableLoader(DataLoader):
    """A training loader that Lightning checkpoints in the middle of an epoch: its state is how many batches
    the training loop has finished, and a loader given that state skips exactly those, so a run resumed from a
    mid-task checkpoint continues at the next batch (the batch order is seeded, hence the same)."""

    def __init__(self, dataset: Dataset, batch_sampler: Sampler[list], trainer: pl.Trainer | None, **kwargs) -> None:
        super().__init__(dataset, batch_sampler=SkipFirst(batch_sampler), **kwargs)
        self.trainer = trainer

    def state_dict(self) -> dict:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"batches_done": done}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batch_sampler.skip = state_dict["batches_done"]  # type: ignore[union-attr]


class Indexed(Dataset):
    """Each example with its position in the dataset, so that a prediction names the example it is for."""

    def __init__(self, examples: Dataset) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return {**self.examples[i], "index": i}


def read_texts(path: str) -> list[str]:
    """The texts of a file to predict for: one per line of a ``.txt`` file, or the ``text`` column of a
    CSV, JSON (lines) or Parquet file."""
    file = Path(path)
    require(file.is_file(), f"data.predict_file: '{path}' does not exist")
    if file.suffix == ".txt":
        return [line for line in file.read_text().splitlines() if line.strip()]
    kinds = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    require(file.suffix in kinds, f"data.predict_file: '{path}' must end in .txt or one of {sorted(kinds)}")
    import datasets

    table = datasets.load_dataset(kinds[file.suffix], data_files=str(file), split="train")
    require(
        "text" in table.column_names, f"data.predict_file: '{path}' has no 'text' column; it has {table.column_names}"
    )
    return [str(text) for text in table["text"]]


class Predictions:
    """``predict_dataloader`` for the datamodules: a split of the source (``predict_split``) or the texts of
    ``predict_file``, each example tagged with its index; labels are -1 for a file, which has none."""

    predict_split: str
    predict_file: str | None
    tokenizer: Any
    max_length: int
    eval_batch_size: int
    num_workers: int
    pad_id: int
    instruction_format: InstructionFormat | None

    @property
    def collate_fn(self):
        """The batch builder of this data's encoding (classes, or instructions for a language model)."""
        return collate_fn(self.instruction_format, self.pad_id)

    def _prediction_loader(self, examples: EncodedExamples | InstructionExamples | None) -> DataLoader:
        if examples is None:
            require(
                self.instruction_format is None,
                "data.predict_file is read by classifiers; a language model predicts for a split of its source "
                "(data.predict_split) and answers each example's instruction",
            )
            texts = read_texts(self.predict_file)  # type: ignore[arg-type]
            require(
                self.tokenizer is not None, "data.predict_file holds texts, but this data has no tokenizer (images)"
            )
            examples = EncodedExamples(
                encode_texts(texts, self.tokenizer, self.max_length), torch.full((len(texts),), -1)
            )
        sampler = ShardedBatchSampler(list(range(len(examples))), self.eval_batch_size, 0, shuffle=False)
        return DataLoader(
            Indexed(examples), batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=self.num_workers
        )


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of a seeded permutation (one permutation per pass), each cut into this rank's share.

    Rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of every global batch, so the union over ranks is the
    single-process batch; a last global batch smaller than ``W`` is dropped so that every rank takes a step.
    """

    def __init__(
        self,
        indices: list[int],
        batch_size: int,
        seed: int,
        passes: int = 1,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.indices, self.batch_size, self.seed, self.passes = indices, batch_size, seed, passes
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size

    def _global_batches(self) -> list[list[int]]:
        batches = []
        for p in range(self.passes):
            order = self.indices
            if self.shuffle:
                perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed * 1000 + p))
                order = [order[i] for i in perm.tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [b for b in batches if len(b) >= self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._global_batches())


class TaskSequenceDataModule(Predictions, pl.LightningDataModule):
    """A sequence of tasks cut from one source; epoch ``t`` trains task ``t`` and validates tasks ``0..t``.

    Args:
        source: where the examples come from (20 Newsgroups, a ``datasets`` dataset, synthetic data).
        scenario: ``class_incremental`` (one head over all classes seen so far), ``task_incremental``
            (prediction restricted to the evaluated task's classes) or ``domain_incremental`` (tasks are the
            source's domains over one label space).
        classes_per_task: cut the seeded class order into tasks of this many classes.
        tasks: explicit class names per task instead of ``classes_per_task``; with neither, a
            :class:`~plan.datamodules.DatasetSequence` source makes one task of each of its datasets, and a
            source of one class (an :class:`~plan.datamodules.InstructionSource`) one task.
        domains: domain order for ``domain_incremental`` (default: sorted domain names).
        class_order_seed: seed of the class order (1993 is the community convention).
        seed: seed of the data order; pass ``p`` of task ``t`` uses a permutation drawn from (seed, t, p).
        passes_per_task: how many times an epoch walks over the task's training data.
        joint: train once on the union of all tasks (the multi-task upper bound), validating on each task.
        val_fraction: hold out this share of each task's training examples (seeded) as a validation split:
            validation, and so the accuracy matrix, then reads it, and the test split is kept for ``plan test``
            (0: validate on the test split, as the published benchmarks report).
        eval_tasks: validate on the tasks ``seen`` so far (the lower triangle of the accuracy matrix) or on
            ``all`` tasks, which also fills the upper triangle and so yields forward transfer.
        batch_size: global batch size; under DDP each rank takes ``batch_size / world_size`` of each batch.
        tokenizer: model name or path whose tokenizer encodes text sources (default: the model's backbone).
        predict_split, predict_file: what ``plan predict`` predicts for: a split of the source, or a file
            (``.txt``, one text per line, or a CSV/JSON/Parquet file with a ``text`` column).
        instructions: how examples become instructions when the model is a language model
            (:class:`plan.datamodules.encoding.InstructionFormat`; default: the tokenizer's chat template, each
            task's label names as options, exact match for labels and ROUGE-L for free text).
    """

    def __init__(
        self,
        source: DataSource,
        scenario: str = "class_incremental",
        classes_per_task: int | None = None,
        tasks: list[list[str]] | None = None,
        domains: list[str] | None = None,
        class_order_seed: int = 1993,
        seed: int = 0,
        passes_per_task: int = 1,
        joint: bool = False,
        val_fraction: float = 0.0,
        eval_tasks: str = "seen",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        num_workers: int = 0,
        predict_split: str = "test",
        predict_file: str | None = None,
        instructions: InstructionFormat | None = None,
    ) -> None:
        super().__init__()
        require(
            predict_split in PREDICT_SPLITS,
            f"data.predict_split must be one of {PREDICT_SPLITS}, got {predict_split!r}",
        )
        require(scenario in SCENARIOS, f"scenario {scenario!r} is not one of {SCENARIOS}")
        require(eval_tasks in ("seen", "all"), f"eval_tasks must be 'seen' or 'all', got {eval_tasks!r}")
        require(passes_per_task >= 1, f"passes_per_task must be >= 1, got {passes_per_task}")
        check_loader_settings(batch_size, eval_batch_size, max_length, num_workers)
        for setting in unused_settings(scenario, classes_per_task, tasks, domains):
            rank_zero_warn(f"{setting}: this setting has no effect")
        self.source = source
        self.scenario = scenario
        self.classes_per_task = classes_per_task
        self.tasks = tasks
        self.domains = domains
        self.class_order_seed = class_order_seed
        self.seed = seed
        self.passes_per_task = passes_per_task
        self.joint = joint
        require(0.0 <= val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.eval_tasks = eval_tasks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.num_workers = num_workers
        self.predict_split, self.predict_file = predict_split, predict_file
        self.instructions = instructions
        self.instruction_format: InstructionFormat | None = None  # set at setup: instructions, for a language model
        self.tokenizer: Any = None  # set at setup: the tokenizer of tokenizer_name (None for images)
        self.tasks_trained: int | None = None  # outside fit: how many tasks the loaded checkpoint had trained
        self.layout: TaskLayout | None = None
        self.pad_id = 0
        self._splits: dict[str, tuple[EncodedExamples | InstructionExamples, list[list[int]]]] = {}

    # -- the sequence -------------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return self._require_layout().num_tasks

    @property
    def num_stages(self) -> int:
        """Training epochs the scenario takes: one per task, or one for the joint upper bound."""
        return 1 if self.joint else self.num_tasks

    def tasks_seen(self, stage: int) -> int:
        """How many tasks have been trained once stage ``stage`` is done."""
        return self.num_tasks if self.joint else stage + 1

    def stage_name(self, stage: int) -> str:
        """The short title of a stage: "task 2/5", or "joint" for the multi-task bound."""
        return "joint" if self.joint else f"task {stage + 1}/{self.num_tasks}"

    def describe_stage(self, stage: int) -> str:
        """What a stage trains, for the logs: the task's number and classes (or domain)."""
        layout = self._require_layout()
        if self.joint:
            return f"joint training on all {layout.num_tasks} tasks ({layout.num_classes} classes)"
        classes = ", ".join(layout.class_names[c] for c in layout.task_classes[stage])
        domain = f" (domain {layout.task_names[stage]})" if layout.scenario == "domain_incremental" else ""
        return f"task {stage + 1} of {layout.num_tasks}{domain}: classes {classes}"

    def fingerprint(self) -> dict:
        layout = self._require_layout()
        return {
            "scenario": layout.scenario,
            "tasks": [[layout.class_names[c] for c in classes] for classes in layout.task_classes],
            "task_names": layout.task_names,
            "joint": self.joint,
            "source": self.source.describe(),
        }

    def _require_layout(self) -> TaskLayout:
        if self.layout is None:
            self.setup("fit")
        assert self.layout is not None  # setup sets it
        return self.layout

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.layout is not None:
            return
        train, test = load_splits(self.source)
        classes = sorted(set(train.labels))
        if self.scenario == "domain_incremental":
            require(
                train.domains is not None,
                f"domain_incremental needs a source with domains; {self.source.describe()} has none",
            )
            self.layout = domain_incremental_layout(classes, train.domains, self.domains)
        else:
            unset = self.tasks is None and self.classes_per_task is None
            per_dataset = unset and isinstance(self.source, DatasetSequence)
            tasks = self.source.tasks() if per_dataset else self.tasks
            if unset and len(classes) == 1:  # one dataset of free-text instructions: one task
                tasks = [classes]
            self.layout = class_incremental_layout(
                classes, self.scenario, self.classes_per_task, tasks, self.class_order_seed
            )
            if per_dataset:  # one task per dataset, in the sequence's order, named after it
                self.layout.task_names = list(self.source.sources)
            left_out = sorted(set(classes) - set(self.layout.class_names))
            require(
                not left_out,
                f"tasks leave out classes {left_out} of the data, whose examples would be dropped; list them in "
                "a task, or use a source that holds only the classes you want",
            )
        self.tokenizer_name = tokenizer_name_for(self.tokenizer_name, self.trainer)
        self.tokenizer, self.pad_id = tokenizer_for(train, self.tokenizer_name, self.max_length)
        self.instruction_format = instruction_format_for(self.instructions, self.trainer)
        self._splits = {
            "train": self._encode(train, self.tokenizer, "train"),
            "test": self._encode(test, self.tokenizer, "test"),
        }
        if self.instruction_format is not None:
            self.layout.metrics = self.instruction_format.task_metrics(free_text_tasks(train, self.layout))
        if self.val_fraction:
            dataset, task_indices = self._splits["train"]
            train_ids, val_ids = hold_out(task_indices, self.val_fraction, self.seed)
            self._splits["train"], self._splits["val"] = (dataset, train_ids), (dataset, val_ids)
        layout, (_, test_tasks) = self.layout, self._splits["test"]
        untested = [
            f"task {t} ({layout.task_names[t]}: classes {[layout.class_names[c] for c in layout.task_classes[t]]})"
            for t, indices in enumerate(test_tasks)
            if not indices
        ]
        require(
            not untested,
            f"{'; '.join(untested)} has no test examples, so its accuracy would read 0.0; add test examples of "
            "it, or use data without it",
        )

    def _encode(
        self, examples: Examples, tokenizer, split: str
    ) -> tuple[EncodedExamples | InstructionExamples, list[list[int]]]:
        """Encode the examples of the layout's classes and list each task's example indices."""
        layout = self._require_layout()
        class_id = {name: i for i, name in enumerate(layout.class_names)}
        task_of_class = {c: t for t, classes in enumerate(layout.task_classes) for c in classes}
        task_of_domain = {d: t for t, d in enumerate(layout.task_names)}
        keep, task_of = [], []
        for i, label in enumerate(examples.labels):
            if label not in class_id:
                continue
            if layout.scenario == "domain_incremental":
                task = task_of_domain.get(examples.domains[i])
            else:
                task = task_of_class[class_id[label]]
            if task is not None:
                keep.append(i)
                task_of.append(task)
        task_indices: list[list[int]] = [[] for _ in range(layout.num_tasks)]
        for i, task in enumerate(task_of):
            task_indices[task].append(i)
        encoded = encode_split(
            examples.subset(keep),
            layout.class_names,
            task_of,
            layout.task_classes,
            self.source,
            self.instruction_format,
            tokenizer,
            self.max_length,
            split,
        )
        return encoded, task_indices

    def _loader(
        self, split: str, indices: list[int], batch_size: int, shuffle: bool, seed: int = 0, passes: int = 1
    ) -> DataLoader:
        dataset, _ = self._splits[split]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        options = {"collate_fn": self.collate_fn, "num_workers": self.num_workers}
        if shuffle:
            sampler = ShardedBatchSampler(indices, batch_size, seed, passes, True, rank, world)
            return ResumableLoader(dataset, sampler, self.trainer, **options)
        return DataLoader(dataset, batch_sampler=eval_batches(indices, batch_size, rank, world), **options)

    @property
    def current_stage(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    def seen_now(self) -> int:
        """Tasks trained so far: up to the current epoch while fitting; outside ``fit``, the tasks the loaded
        checkpoint had trained (every task for a finished sequence, or without a checkpoint)."""
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return self.tasks_trained or self.num_tasks
        return self.tasks_seen(self.current_stage)

    def train_dataloader(self) -> DataLoader:
        _, task_indices = self._splits["train"]
        stage = self.current_stage
        indices = [i for task in task_indices for i in task] if self.joint else task_indices[stage]
        if not indices:
            raise ValueError(f"task {stage} ({self._require_layout().task_names[stage]}) has no training examples")
        return self._loader(
            "train", indices, self.batch_size, True, seed=self.seed * 7919 + stage, passes=self.passes_per_task
        )

    def val_dataloader(self) -> list[DataLoader]:
        count = self.num_tasks if self.eval_tasks == "all" else self.seen_now()
        return self.task_eval_loaders(count)

    @property
    def validation_split(self) -> str:
        """The split validation reads: the held-out part of the training data, or the test split."""
        return "val" if "val" in self._splits else "test"

    def test_dataloader(self) -> list[DataLoader]:
        seen = self.seen_now()
        if seen < self.num_tasks:
            rank_zero_info(f"the checkpoint has trained {seen} of {self.num_tasks} tasks: testing tasks 0..{seen - 1}")
        return self.task_eval_loaders(seen, "test")

    def predict_dataloader(self) -> DataLoader:
        return self._prediction_loader(self._splits[self.predict_split][0] if self.predict_file is None else None)

    def task_train_loader(self, task: int, max_examples: int | None = None) -> DataLoader:
        """One pass over ``task``'s training data (this rank's shard), for input statistics: all of it, or
        ``max_examples`` drawn at random with a seed fixed per task, so a capped pass is a fair sample of the
        task's classes rather than the first ones in file order."""
        _, task_indices = self._splits["train"]
        indices = task_indices[task]
        if max_examples is not None and max_examples < len(indices):
            pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed * 7919 + task))
            indices = [indices[i] for i in sorted(pick[:max_examples].tolist())]
        return self._loader("train", indices, self.eval_batch_size, False)

    def task_eval_loaders(self, count: int, split: str | None = None) -> list[DataLoader]:
        """One evaluation loader per task ``0..count-1``, on ``split`` (default: the validation split)."""
        split = split or self.validation_split
        _, task_indices = self._splits[split]
        return [self._loader(split, task_indices[t], self.eval_batch_size, False) for t in range(count)]

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint(), "tasks_trained": self.seen_now()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tasks_trained = state_dict.get("tasks_trained")
        stored, current = state_dict.get("fingerprint"), self.fingerprint()
        if stored != current:
            diff = {k: ((stored or {}).get(k), current[k]) for k in current if (stored or {}).get(k) != current[k]}
            raise ValueError(
                "checkpoint belongs to a different task sequence; (checkpoint, this run) differ in: "
                + "; ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in diff.items())
            )


def hold_out(task_indices: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split every group of example indices (a task's) into (training, validation): a seeded ``fraction`` of
    each group (at least one example, at least one left to train on) goes to validation."""
    train: list[list[int]] = []
    val: list[list[int]] = []
    for task, indices in enumerate(task_indices):
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 7919 + task + 104729))
        count = min(max(1, round(fraction * len(indices))), len(indices) - 1)
        val.append(sorted(indices[i] for i in order[:count].tolist()))
        train.append(sorted(indices[i] for i in order[count:].tolist()))
    return train, val
