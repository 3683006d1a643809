"""Task sequences: how sources are cut into tasks, how batches are sharded, and what a checkpoint refuses.

Everything runs on the seeded ``SyntheticSource``, tiny CSV files and the embedded 20 Newsgroups, with the
embedded MiniLM tokenizer; no network is used.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from plan.datamodules import HuggingFaceSource, SyntheticSource, TaskSequenceDataModule, TwentyNewsgroups
from plan.datamodules.continual import ShardedBatchSampler, class_incremental_layout
from plan.datamodules.encoding import collate

CLASSES_20 = [f"c{i:02d}" for i in range(20)]


@contextlib.contextmanager
def as_rank(dm: TaskSequenceDataModule, rank: int, world_size: int, epoch: int = 0):
    """Pretend the datamodule runs under a trainer at ``rank`` of ``world_size``, during ``epoch``."""
    dm.trainer = SimpleNamespace(
        global_rank=rank, world_size=world_size, current_epoch=epoch, state=SimpleNamespace(fn=TrainerFn.FITTING)
    )
    try:
        yield dm
    finally:
        dm.trainer = None


def interleave(shards: list[list[int]]) -> list[int]:
    """Undo the rank split: rank r holds positions r, r+W, ... of the global batch."""
    out = []
    for i in range(max(len(s) for s in shards)):
        out += [s[i] for s in shards if i < len(s)]
    return out


@pytest.fixture(scope="module")
def six_classes() -> TaskSequenceDataModule:
    """Class-incremental: 6 synthetic classes, 2 per task (16 train / 8 test examples per class)."""
    dm = TaskSequenceDataModule(SyntheticSource(num_classes=6), classes_per_task=2, batch_size=4, passes_per_task=2)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def three_domains() -> TaskSequenceDataModule:
    dm = TaskSequenceDataModule(
        SyntheticSource(num_classes=4, num_domains=3), scenario="domain_incremental", batch_size=4
    )
    dm.setup("fit")
    return dm


# -- class_incremental_layout ---------------------------------------------------------------------------


def test_class_order_is_a_seeded_permutation() -> None:
    """The order is a permutation of the classes, fixed by the seed and changed by another seed."""
    a = class_incremental_layout(CLASSES_20, "class_incremental", 5, None, order_seed=1993)
    again = class_incremental_layout(list(reversed(CLASSES_20)), "class_incremental", 5, None, order_seed=1993)
    other = class_incremental_layout(CLASSES_20, "class_incremental", 5, None, order_seed=0)
    assert sorted(a.class_names) == CLASSES_20
    assert a.class_names == again.class_names  # input order does not matter, only the seed
    assert a.class_names != other.class_names
    assert a.class_names != CLASSES_20  # actually shuffled


@pytest.mark.parametrize("k", [1, 2, 4, 5, 10, 20])
def test_task_t_owns_contiguous_ids(k: int) -> None:
    """With k classes per task, task t holds global ids [t*k, (t+1)*k)."""
    layout = class_incremental_layout(CLASSES_20, "class_incremental", k, None, order_seed=3)
    assert layout.num_tasks == 20 // k and layout.num_classes == 20
    assert layout.task_classes == [list(range(t * k, (t + 1) * k)) for t in range(20 // k)]
    assert layout.task_names == [f"task_{t}" for t in range(20 // k)]


def test_explicit_tasks_keep_given_order() -> None:
    """Explicit class-name tasks are used as given: ids follow the listed order, sizes may differ."""
    tasks = [["c07", "c02"], ["c15"], ["c00", "c19", "c03"]]
    layout = class_incremental_layout(CLASSES_20, "task_incremental", None, tasks, order_seed=1993)
    assert layout.class_names == ["c07", "c02", "c15", "c00", "c19", "c03"]
    assert layout.task_classes == [[0, 1], [2], [3, 4, 5]]
    assert layout.scenario == "task_incremental"


def test_unknown_class_names_are_refused() -> None:
    """A task naming a class the data lacks raises, naming the unknown class and listing the known ones."""
    with pytest.raises(ValueError, match="unknown classes") as err:
        class_incremental_layout(CLASSES_20, "class_incremental", None, [["c01", "nope"]], order_seed=0)
    assert "nope" in str(err.value)
    assert all(c in str(err.value) for c in CLASSES_20)


@pytest.mark.parametrize("k", [3, 7, 0, None])
def test_classes_per_task_must_divide_class_count(k) -> None:
    """classes_per_task that does not cut the 20 classes evenly (or is missing) raises."""
    with pytest.raises(ValueError, match="classes_per_task"):
        class_incremental_layout(CLASSES_20, "class_incremental", k, None, order_seed=0)


# -- the class-incremental datamodule -------------------------------------------------------------------


def test_setup_gives_three_tasks_of_two_classes(six_classes: TaskSequenceDataModule) -> None:
    """6 classes at 2 per task make 3 tasks over 6 global ids."""
    assert six_classes.num_tasks == 3 and six_classes.num_stages == 3
    assert six_classes.layout.task_classes == [[0, 1], [2, 3], [4, 5]]
    _, train_tasks = six_classes._splits["train"]
    _, test_tasks = six_classes._splits["test"]
    assert [len(t) for t in train_tasks] == [32, 32, 32]
    assert [len(t) for t in test_tasks] == [16, 16, 16]


def test_global_ids_name_the_source_labels(six_classes: TaskSequenceDataModule) -> None:
    """Each encoded label id maps back, through the layout, to the source's class name."""
    source_labels = six_classes.source.load("train").labels
    dataset, _ = six_classes._splits["train"]
    assert [six_classes.layout.class_names[i] for i in dataset.labels.tolist()] == source_labels


@pytest.mark.parametrize("task", [0, 1, 2])
def test_training_batches_hold_only_the_current_task(six_classes: TaskSequenceDataModule, task: int) -> None:
    """During epoch t every training batch (all passes) holds only task t's classes, and every example of it."""
    with as_rank(six_classes, 0, 1, epoch=task):
        loader = six_classes.train_dataloader()
        labels = torch.cat([batch["labels"] for batch in loader])
    assert set(labels.tolist()) <= set(six_classes.layout.task_classes[task])
    assert Counter(labels.tolist()) == {c: 16 * 2 for c in six_classes.layout.task_classes[task]}  # 2 passes


def test_capped_statistics_pass_is_a_seeded_sample_of_every_class(six_classes: TaskSequenceDataModule) -> None:
    """The data is stored class by class; a capped statistics pass still draws from both of task 1's classes,
    the same examples on every call, and an uncapped pass reads every example once."""

    def ids(cap):
        batches = six_classes.task_train_loader(1, cap)
        return [
            tuple(row[mask].tolist()) for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"].bool())
        ]

    full, capped = ids(None), ids(8)
    labels = torch.cat([batch["labels"] for batch in six_classes.task_train_loader(1, 8)]).tolist()
    assert len(full) == 32 and len(capped) == 8 and set(capped) <= set(full)
    assert set(labels) == {2, 3} and ids(8) == capped
    assert ids(100) == full


def test_validation_covers_tasks_seen_so_far(six_classes: TaskSequenceDataModule) -> None:
    """Epoch t validates tasks 0..t, one loader each, on that task's test classes; test covers all tasks."""
    for epoch in range(3):
        with as_rank(six_classes, 0, 1, epoch=epoch):
            loaders = six_classes.val_dataloader()
        assert len(loaders) == epoch + 1
        for t, loader in enumerate(loaders):
            labels = torch.cat([batch["labels"] for batch in loader]).tolist()
            assert len(labels) == 16 and set(labels) == set(six_classes.layout.task_classes[t])
    assert len(six_classes.test_dataloader()) == 3


def test_text_batches_are_padded_to_longest(six_classes: TaskSequenceDataModule) -> None:
    """Loader batches have input_ids and attention_mask as wide as their longest example."""
    batch = next(iter(six_classes.test_dataloader()[0]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).max().item() == batch["input_ids"].shape[1]


# -- ShardedBatchSampler --------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch_size,world", [(32, 4, 2), (30, 8, 2), (33, 6, 3), (20, 5, 4)])
def test_ranks_together_see_the_single_process_batches(n: int, batch_size: int, world: int) -> None:
    """Interleaving the ranks' shares of each step rebuilds the single-process batch, in order."""
    indices = list(range(100, 100 + n))
    single = list(ShardedBatchSampler(indices, batch_size, seed=5, passes=2))
    ranks = [
        list(ShardedBatchSampler(indices, batch_size, seed=5, passes=2, rank=r, world_size=world)) for r in range(world)
    ]
    assert all(len(r) == len(single) for r in ranks)
    assert all(
        len(s) == len(r)
        for s in [ShardedBatchSampler(indices, batch_size, 5, 2, rank=r, world_size=world) for r in range(world)]
        for r in ranks
    )
    for step, batch in enumerate(single):
        assert interleave([r[step] for r in ranks]) == batch


def test_last_batch_smaller_than_world_is_dropped_on_every_rank() -> None:
    """A final global batch with fewer examples than ranks is skipped by all ranks, so every rank steps alike."""
    indices = list(range(9))  # batches of 4, 4, 1
    ranks = [list(ShardedBatchSampler(indices, 4, seed=0, shuffle=False, rank=r, world_size=2)) for r in range(2)]
    assert ranks == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]
    assert len(list(ShardedBatchSampler(indices, 4, seed=0, shuffle=False))) == 3


def test_each_pass_is_a_fresh_permutation() -> None:
    """With passes=2 each pass walks every index exactly once, and the two passes differ in order."""
    indices = list(range(50, 90))
    batches = list(ShardedBatchSampler(indices, 8, seed=11, passes=2))
    flat = [i for b in batches for i in b]
    first, second = flat[:40], flat[40:]
    assert sorted(first) == indices and sorted(second) == indices
    assert first not in (second, indices)


def test_same_seed_same_order() -> None:
    """The shuffle depends only on the seed: same seed, same batches; other seed, other batches."""
    indices = list(range(64))
    a = list(ShardedBatchSampler(indices, 8, seed=3, passes=2))
    assert a == list(ShardedBatchSampler(indices, 8, seed=3, passes=2))
    assert a != list(ShardedBatchSampler(indices, 8, seed=4, passes=2))


@pytest.mark.parametrize("task", [0, 2])
def test_datamodule_train_sharding_matches_single_process(six_classes: TaskSequenceDataModule, task: int) -> None:
    """Through the datamodule, two ranks' train loaders rebuild the single-process batches step by step."""
    with as_rank(six_classes, 0, 1, epoch=task):
        single = list(six_classes.train_dataloader().batch_sampler)
    ranks = []
    for r in range(2):
        with as_rank(six_classes, r, 2, epoch=task):
            ranks.append(list(six_classes.train_dataloader().batch_sampler))
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 16  # 32 examples / 4 per batch x 2 passes
    for step, batch in enumerate(single):
        assert interleave([ranks[0][step], ranks[1][step]]) == batch
    with as_rank(six_classes, 0, 1, epoch=task):
        assert list(six_classes.train_dataloader().batch_sampler) == single  # reproducible


@pytest.mark.parametrize("world", [2, 3, 5])
def test_eval_shards_are_disjoint_and_complete(six_classes: TaskSequenceDataModule, world: int) -> None:
    """Each task's evaluation loaders across ranks hold every test example exactly once, no padding."""
    _, test_tasks = six_classes._splits["test"]
    per_rank = []
    for r in range(world):
        with as_rank(six_classes, r, world, epoch=2):
            per_rank.append([[i for b in loader.batch_sampler for i in b] for loader in six_classes.val_dataloader()])
    for t, expected in enumerate(test_tasks):
        shards = [per_rank[r][t] for r in range(world)]
        seen = [i for shard in shards for i in shard]
        assert sorted(seen) == sorted(expected)  # complete, no duplicates
        assert all(not set(a) & set(b) for k, a in enumerate(shards) for b in shards[k + 1 :])


# -- domain-incremental ---------------------------------------------------------------------------------


def test_domain_incremental_one_task_per_domain(three_domains: TaskSequenceDataModule) -> None:
    """Three domains make three tasks; each task's train set holds only its domain, over one shared label space."""
    layout = three_domains.layout
    assert three_domains.num_tasks == 3
    assert layout.task_names == ["domain_0", "domain_1", "domain_2"]
    assert layout.task_classes == [[0, 1, 2, 3]] * 3
    source = three_domains.source.load("train")
    dataset, task_indices = three_domains._splits["train"]
    assert len(dataset) == len(source)  # every example kept, so indices line up with the source
    for t, indices in enumerate(task_indices):
        assert {source.domains[i] for i in indices} == {layout.task_names[t]}
        assert set(dataset.labels[indices].tolist()) == {0, 1, 2, 3}


def test_domain_order_is_followed() -> None:
    """An explicit domain order sets the task order; a partial order keeps only the named domains."""
    source = SyntheticSource(num_classes=4, num_domains=3)
    examples = source.load("train")
    dm = TaskSequenceDataModule(source, scenario="domain_incremental", domains=["domain_2", "domain_0", "domain_1"])
    dm.setup("fit")
    assert dm.layout.task_names == ["domain_2", "domain_0", "domain_1"]
    _, task_indices = dm._splits["train"]
    assert [{examples.domains[i] for i in idx} for idx in task_indices] == [{"domain_2"}, {"domain_0"}, {"domain_1"}]

    partial = TaskSequenceDataModule(source, scenario="domain_incremental", domains=["domain_2", "domain_0"])
    partial.setup("fit")
    dataset, task_indices = partial._splits["train"]
    assert partial.num_tasks == 2 and len(dataset) == 2 * len(examples) // 3
    assert [len(idx) for idx in task_indices] == [len(examples) // 3] * 2


def test_unknown_domain_is_refused() -> None:
    """A domain order naming a domain the data lacks raises, naming it."""
    dm = TaskSequenceDataModule(
        SyntheticSource(num_classes=4, num_domains=3), scenario="domain_incremental", domains=["domain_0", "domain_9"]
    )
    with pytest.raises(ValueError, match="domain_9"):
        dm.setup("fit")


def test_domain_incremental_needs_domains() -> None:
    """A source without domains cannot be cut by domain."""
    dm = TaskSequenceDataModule(SyntheticSource(num_classes=4), scenario="domain_incremental")
    with pytest.raises(ValueError, match="domain_incremental needs a source with domains"):
        dm.setup("fit")


# -- HuggingFaceSource on local CSV ---------------------------------------------------------------------


@pytest.fixture
def csv_files(tmp_path, monkeypatch) -> dict[str, str]:
    """Tiny train/test CSV files; the datasets cache goes under tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("body,topic\nthe cat sat,animals\nstocks fell,money\na dog ran,animals\n")
    test.write_text("body,topic\nbonds rose,money\n")
    return {"train": str(train), "test": str(test)}


def test_csv_source_loads_texts_and_labels(csv_files: dict[str, str]) -> None:
    """Named text and label columns of local CSV files become Examples."""
    source = HuggingFaceSource(path="csv", data_files=csv_files, text_column="body", label_column="topic")
    train, test = source.load("train"), source.load("test")
    assert train.inputs == ["the cat sat", "stocks fell", "a dog ran"]
    assert train.labels == ["animals", "money", "animals"]
    assert train.domains is None
    assert test.inputs == ["bonds rose"] and test.labels == ["money"]


@pytest.mark.parametrize("column", ["text_column", "label_column"])
def test_csv_source_missing_column(csv_files: dict[str, str], column: str) -> None:
    """A column the file lacks raises, naming the missing column and listing the available ones."""
    kwargs = {"text_column": "body", "label_column": "topic", column: "missing_col"}
    source = HuggingFaceSource(path="csv", data_files=csv_files, **kwargs)
    with pytest.raises(ValueError, match="missing_col") as err:
        source.load("train")
    assert "body" in str(err.value) and "topic" in str(err.value)


def test_csv_source_missing_split(csv_files: dict[str, str]) -> None:
    """Asking for a split the dataset lacks raises, naming that split."""
    source = HuggingFaceSource(
        path="csv",
        data_files={"train": csv_files["train"]},
        text_column="body",
        label_column="topic",
        test_split="validation",
    )
    with pytest.raises(ValueError, match="'validation'"):
        source.load("test")


# -- 20 Newsgroups --------------------------------------------------------------------------------------


def test_newsgroups_full_splits() -> None:
    """The embedded data has 11,293 train and 7,528 test documents over 20 newsgroups."""
    source = TwentyNewsgroups()
    train, test = source.load("train"), source.load("test")
    assert len(train) == 11293 and len(test) == 7528
    assert len(set(train.labels)) == 20 and set(test.labels) == set(train.labels)
    assert all(isinstance(t, str) for t in train.inputs[:10])


def test_newsgroups_per_class_subsample_is_exact_and_seeded() -> None:
    """train_per_class=5 keeps exactly 5 documents of each group, the same ones for the same seed."""
    a = TwentyNewsgroups(train_per_class=5, seed=1).load("train")
    assert Counter(a.labels) == {label: 5 for label in set(a.labels)} and len(a) == 100
    b = TwentyNewsgroups(train_per_class=5, seed=1).load("train")
    assert a.inputs == b.inputs and a.labels == b.labels
    assert TwentyNewsgroups(train_per_class=5, seed=2).load("train").inputs != a.inputs


def test_newsgroups_domain_labels() -> None:
    """labels='domain' gives the 4 super-groups as labels and d1..d4 as domains."""
    examples = TwentyNewsgroups(labels="domain", test_per_class=3).load("test")
    assert set(examples.labels) == {"comp", "rec", "sci", "talk"}
    assert set(examples.domains) == {"d1", "d2", "d3", "d4"}
    assert Counter(zip(examples.domains, examples.labels)) == {
        (d, c): 3 for d in ("d1", "d2", "d3", "d4") for c in ("comp", "rec", "sci", "talk")
    }


# -- checkpoints ----------------------------------------------------------------------------------------


def test_state_dict_refuses_other_class_order(six_classes: TaskSequenceDataModule) -> None:
    """A checkpoint from another class order is refused: it belongs to a different task sequence."""
    other = TaskSequenceDataModule(SyntheticSource(num_classes=6), classes_per_task=2, class_order_seed=7)
    assert other.fingerprint()["tasks"] != six_classes.fingerprint()["tasks"]
    with pytest.raises(ValueError, match="different task sequence"):
        other.load_state_dict(six_classes.state_dict())


def test_state_dict_accepts_same_configuration(six_classes: TaskSequenceDataModule) -> None:
    """The same source and split load each other's state (a round trip through torch.save included)."""
    import io

    buffer = io.BytesIO()
    torch.save(six_classes.state_dict(), buffer)
    buffer.seek(0)
    same = TaskSequenceDataModule(SyntheticSource(num_classes=6), classes_per_task=2, batch_size=16, passes_per_task=1)
    same.load_state_dict(torch.load(buffer, weights_only=False))


def test_state_dict_without_fingerprint_is_refused(six_classes: TaskSequenceDataModule) -> None:
    """A state without a fingerprint is refused with the same ValueError, not an AttributeError."""
    with pytest.raises(ValueError, match="different task sequence"):
        six_classes.load_state_dict({})


# -- collate --------------------------------------------------------------------------------------------


def test_collate_pads_to_longest() -> None:
    """Token ids and masks are right-padded to the longest item; masks pad with 0, ids with pad_id."""
    items = [
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": torch.tensor(0)},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": torch.tensor(3)},
        {"input_ids": [101, 5, 6, 8, 102], "attention_mask": [1, 1, 1, 1, 1], "labels": torch.tensor(1)},
    ]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0], [101, 5, 6, 8, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 3, 1]
    padded = collate(items, pad_id=9)
    assert padded["input_ids"][1].tolist() == [101, 102, 9, 9, 9]
    assert padded["attention_mask"].tolist() == batch["attention_mask"].tolist()


def test_collate_stacks_images() -> None:
    """Image items are stacked into one (N, C, H, W) tensor."""
    items = [{"pixel_values": torch.full((3, 4, 4), float(i)), "labels": torch.tensor(i)} for i in range(2)]
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [0, 1]
