"""Every mistake answered: a bad setting or bad data raises :class:`plan.errors.ConfigError` before training,
naming the key, the bad value and what would be valid; a legal but suspicious setting warns.

Everything here builds objects directly (no fit): synthetic data, tiny in-memory or CSV sources, a tiny
random-weight BERT, and the embedded MiniLM tokenizer where text is encoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from conftest import TINY_BERT
from torch import nn

from plan.aggregation import LoRAFAIR, make_rule
from plan.callbacks import PLAN, InfLoRA, OLoRA, ProgressiveActivation, SubspaceMemory
from plan.datamodules import FederatedDataModule, HuggingFaceSource, SyntheticSource, TaskSequenceDataModule
from plan.datamodules.continual import class_incremental_layout, domain_incremental_layout
from plan.datamodules.sources import DataSource, Examples, unusable_rows
from plan.errors import ConfigError
from plan.lora import LoRAConfig, inject_lora
from plan.models import EMBEDDED_MINILM, check_vocabulary, load_backbone, load_tokenizer
from plan.partition import iid_partition, partition

DATAMODULES = {
    "continual": lambda source, **kw: TaskSequenceDataModule(source, classes_per_task=2, **kw),
    "federated": lambda source, **kw: FederatedDataModule(source, num_clients=2, **kw),
}


@contextlib.contextmanager
def config_error(*named: str) -> Iterator[None]:
    """Expect a ConfigError whose message contains every one of ``named`` (key, bad value, valid values)."""
    with pytest.raises(ConfigError) as info:
        yield
    for word in named:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


class ListSource(DataSource):
    """Train and test splits given as (text, label) pairs."""

    def __init__(self, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> None:
        self.splits = {"train": train, "test": test}

    def describe(self) -> str:
        return "ListSource"

    def load(self, split: str) -> Examples:
        rows = self.splits[split]
        return Examples([text for text, _ in rows], [label for _, label in rows])


def rows(*labels: str) -> list[tuple[str, str]]:
    return [(f"an example of {label} number {i}", label) for label in labels for i in range(2)]


# -- LoRA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0, 0.0, -8])
def test_lora_alpha_must_be_positive(alpha) -> None:
    """alpha 0 scales every update to nothing, a negative alpha flips it."""
    with config_error("lora.alpha", f"got {alpha}", "> 0"):
        LoRAConfig(rank=4, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_lora_dropout_must_be_a_probability_below_one(dropout) -> None:
    with config_error("lora.dropout", f"got {dropout}", "[0, 1)"):
        LoRAConfig(dropout=dropout)


def test_lora_kernel_must_be_known() -> None:
    with config_error("lora.kernel", "'cuda'", "'auto', 'triton', 'torch'"):
        LoRAConfig(kernel="cuda")


@pytest.mark.parametrize("rank", [0, -1])
def test_lora_rank_below_one_is_refused_at_injection(rank) -> None:
    """The rank's valid range depends on the layer, so it is checked where the layer is known."""
    with config_error(f"rank {rank}", "'0'", "1..8"):
        inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(rank=rank, target_modules=["0"]))


# -- loader settings, both datamodules -------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DATAMODULES))
@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("batch_size", 0, ">= 1"),
        ("batch_size", -4, ">= 1"),
        ("eval_batch_size", 0, ">= 1"),
        ("max_length", 0, ">= 1"),
        ("num_workers", -1, ">= 0"),
    ],
)
def test_loader_settings_are_checked_at_construction(kind: str, key: str, value: int, valid: str) -> None:
    """Today batch_size 0 would fail mid-fit with range()'s 'arg 3 must not be zero'."""
    with config_error(key, f"got {value}", valid):
        DATAMODULES[kind](SyntheticSource(num_classes=4), **{key: value})


def test_max_length_must_leave_room_for_text() -> None:
    """MiniLM's tokenizer adds [CLS] and [SEP]; max_length 2 would keep only those (and 1 would be ignored)."""
    dm = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2, max_length=2)
    with config_error("max_length=2", "2 special tokens", "max_length > 2"):
        dm.setup("fit")


def test_max_length_beyond_the_tokenizer_warns() -> None:
    dm = TaskSequenceDataModule(SyntheticSource(num_classes=4, train_per_class=2, test_per_class=1), classes_per_task=2)
    dm.max_length = 1024
    with pytest.warns(UserWarning, match="max_length=1024 exceeds the 512 tokens"):
        dm.setup("fit")


# -- task splits -----------------------------------------------------------------------------------------


def test_classes_left_out_of_explicit_tasks_are_refused() -> None:
    """Classes no task lists would be dropped silently; the message lists them and says what to do."""
    dm = TaskSequenceDataModule(ListSource(rows("a", "b", "c", "d"), rows("a", "b", "c", "d")), tasks=[["a"], ["c"]])
    with config_error("tasks leave out classes ['b', 'd']", "list them", "only the classes you want"):
        dm.setup("fit")


def test_empty_task_and_uneven_cut_are_refused() -> None:
    with config_error("tasks", "[1]", "at least one class"):
        class_incremental_layout(["a", "b"], "class_incremental", None, [["a", "b"], []], 0)
    with config_error("classes_per_task=4", "6 classes", "[1, 2, 3, 6]"):
        class_incremental_layout(list("abcdef"), "class_incremental", 4, None, 0)


def test_repeated_domain_is_refused() -> None:
    with config_error("domains", "['d1']", "each domain is one task"):
        domain_incremental_layout(["a", "b"], ["d0", "d1"], ["d1", "d0", "d1"])


def test_one_class_tasks_under_task_incremental_warn() -> None:
    """Task-incremental evaluation ranks only the task's classes: with one, accuracy is 1.0 by construction."""
    with pytest.warns(UserWarning, match=r"one-class tasks \['task_1'\].*1\.0"):
        class_incremental_layout(["a", "b", "c"], "task_incremental", None, [["a", "b"], ["c"]], 0)


@pytest.mark.parametrize(
    "kwargs, unused",
    [
        ({"scenario": "domain_incremental", "classes_per_task": 2}, "classes_per_task (the tasks are the domains)"),
        ({"scenario": "class_incremental", "domains": ["domain_0"]}, "domains (class_incremental tasks are class"),
        ({"classes_per_task": 2, "tasks": [["class_0", "class_1"]]}, "classes_per_task (the explicit tasks decide)"),
    ],
)
def test_settings_the_scenario_ignores_warn(kwargs: dict, unused: str) -> None:
    with pytest.warns(UserWarning, match=unused.replace("(", r"\(").replace(")", r"\)")):
        TaskSequenceDataModule(SyntheticSource(num_classes=4), **kwargs)


@pytest.mark.parametrize("kind", sorted(DATAMODULES))
def test_classes_only_in_the_test_split_are_refused(kind: str) -> None:
    """The model could never predict them; both datamodules share the check in load_splits."""
    source = ListSource(rows("a", "b", "c", "d"), rows("a", "b", "c", "d", "e"))
    with config_error("test split", "lacks: ['e']", "add training examples"):
        DATAMODULES[kind](source).setup("fit")


def test_task_without_test_examples_is_refused() -> None:
    """Its accuracy would read 0.0, as if forgotten; the message names the task and its classes."""
    dm = TaskSequenceDataModule(ListSource(rows("a", "b", "c", "d"), rows("a", "b")), tasks=[["a", "b"], ["c", "d"]])
    with (
        pytest.warns(UserWarning, match=r"classes \['c', 'd'\] have no test examples"),
        config_error("task 1 (task_1: classes ['c', 'd'])", "no test examples", "accuracy would read 0.0"),
    ):
        dm.setup("fit")


# -- CSV files -------------------------------------------------------------------------------------------


@pytest.fixture
def write_csv(tmp_path, monkeypatch) -> Callable[..., HuggingFaceSource]:
    """Writes train/test CSV files and returns a source over them; the datasets cache goes under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    good = "text,label\nthe cat sat,animals\nstocks fell,money\n"

    def write(train: str, test: str = good) -> HuggingFaceSource:
        files = {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"}
        files["train"].write_text(train)
        files["test"].write_text(test)
        return HuggingFaceSource(path="csv", data_files={k: str(v) for k, v in files.items()})

    return write


def test_empty_label_cell_names_the_file_column_and_rows(write_csv) -> None:
    """An empty label would become a class named 'None'."""
    source = write_csv("text,label\nthe cat sat,animals\nstocks fell,\na dog ran,animals\nbonds rose,money\n")
    with config_error("train.csv", "column 'label'", "1 empty cell(s)", "rows [2]"):
        source.load("train")


def test_blank_text_cells_name_the_file_column_and_rows(write_csv) -> None:
    """A missing or whitespace-only text would be a tokenizer TypeError naming no row."""
    source = write_csv("text,label\nthe cat sat,animals\n,money\n   ,animals\nbonds rose,money\n")
    with config_error("train.csv", "column 'text'", "2 empty or non-text cell(s)", "rows [2, 3]"):
        source.load("train")


@pytest.mark.parametrize("content, why", [("", "is empty"), ("text,label\n", "has a header line but no rows")])
def test_rowless_csv_names_the_file(write_csv, content: str, why: str) -> None:
    """Today a generic DatasetGenerationError, or 'Instruction "train" corresponds to no data!'."""
    source = write_csv("text,label\nthe cat sat,animals\nstocks fell,money\n", test=content)
    with config_error("test.csv (data_files['test'])", why):
        source.load("train")


def test_single_class_label_column_is_refused(write_csv) -> None:
    """A one-class head is a torchmetrics error at setup today."""
    source = write_csv("text,label\nthe cat sat,animals\na dog ran,animals\n")
    with config_error("column 'label'", "one class, 'animals'", "at least 2"):
        source.load("train")


def test_unlabelled_class_label_rows_are_unusable() -> None:
    """``datasets`` marks an unlabelled row of a ClassLabel column with -1 (GLUE's test splits)."""
    assert unusable_rows([0, -1, 1, None], class_label=True) == [1, 3]
    assert unusable_rows(["ok", " ", 3, None], text=True) == [1, 2, 3]
    assert unusable_rows([0, -1, 1]) == []


# -- the backbone's vocabulary ---------------------------------------------------------------------------


def test_tokenizer_larger_than_the_embedding_table_is_refused() -> None:
    """Token ids past the table are an IndexError mid-fit; the message names both models and both sizes."""
    small = load_backbone(config={**TINY_BERT, "vocab_size": 100})
    tokenizer = load_tokenizer()
    with config_error(f"tokenizer '{EMBEDDED_MINILM}' has 30522 tokens", "backbone 'tiny-bert' embeds only 100"):
        check_vocabulary(small, tokenizer, "tiny-bert", EMBEDDED_MINILM)
    check_vocabulary(load_backbone(config=TINY_BERT), tokenizer, "tiny-bert", EMBEDDED_MINILM)
    check_vocabulary(small, None, "tiny-bert", "none: images")


# -- constructors of sources, methods, rules and partitions ----------------------------------------------


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda: SyntheticSource(num_classes=1), ("num_classes", "got 1", ">= 2")),
        (lambda: SyntheticSource(train_per_class=0), ("train_per_class", "got 0", ">= 1")),
        (lambda: HuggingFaceSource("csv", test_per_class=-3), ("test_per_class", "got -3", ">= 1")),
        (lambda: OLoRA(lambda_orth=-0.5), ("lambda_orth", "got -0.5", ">= 0")),
        (lambda: OLoRA(form="cube"), ("form", "'cube'", "'abs' or 'squared'")),
        (lambda: InfLoRA(a_scale=0.0), ("a_scale", "got 0.0", "> 0")),
        (lambda: ProgressiveActivation(start=1.5), ("start", "got 1.5", "[0, 1]")),
        (lambda: ProgressiveActivation(ramp=-1), ("ramp", "got -1", ">= 0")),
        (lambda: SubspaceMemory(threshold_end=0.0), ("threshold_end", "got 0.0", "(0, 1]")),
        (lambda: SubspaceMemory(max_examples=0), ("max_examples", "got 0", "positive")),
        (lambda: PLAN(pool="huge"), ("pool", "'huge'", "'random'")),
        (lambda: PLAN(pool_size=0), ("pool_size", "got 0", ">= 1")),
        (lambda: PLAN(perturbation_scale=-0.1), ("perturbation_scale", "got -0.1", ">= 0")),
        (lambda: LoRAFAIR(lr=0), ("lr=0", "lr > 0")),
        (lambda: make_rule("fedavg"), ("'fedavg'", "'fedit'")),
        (lambda: partition("bogus", [0, 1], 2, 0), ("'bogus'", "'iid'")),
        (lambda: iid_partition(10, 2, 0, min_size=0), ("min_client_size", "got 0", ">= 1")),
    ],
)
def test_bad_constructor_arguments_are_named(build: Callable[[], object], named: tuple[str, ...]) -> None:
    with config_error(*named):
        build()
