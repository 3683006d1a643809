"""Instruction data for a language model: answers scored against independent references (exact match after
normalisation, ROUGE-L as an LCS F-measure on words), bad data and settings refused with the bad value and what
is valid, prompts too long cut as documented, and InstructionSource files (prompt/response columns, chat
messages) served by a TaskSequenceDataModule to a ContinualLM through a real Trainer.

The tokenizer is the embedded SmolLM2's (offline); the model is a tiny random-weight Llama.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA_LM

from plan.datamodules import DatasetSequence, InstructionSource, TaskSequenceDataModule
from plan.datamodules.encoding import (
    InstructionFormat,
    encode_instruction_examples,
    encode_labelled_text,
    instruction_format_for,
)
from plan.datamodules.sources import DataSource, Examples
from plan.errors import ConfigError
from plan.instructions import (
    IGNORE,
    METRICS,
    classification_prompt,
    encode_instruction,
    exact_match,
    normalise_answer,
    rouge_l,
    score_answer,
)
from plan.language_model import ContinualLM
from plan.lora import LoRAConfig
from plan.models import EMBEDDED_SMOLLM, load_tokenizer
from plan.module import ContinualClassifier


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(EMBEDDED_SMOLLM)


def named(error: pytest.ExceptionInfo, *words: str) -> None:
    """Every one of ``words`` (the key, the bad value, what is valid) is in the error's message."""
    for word in words:
        assert word in str(error.value), f"{word!r} not in: {error.value}"


def chat_ids(tokenizer, turns: list[dict[str, str]]) -> list[int]:
    """The turns as the tokenizer's own chat template renders them, with the assistant's opening."""
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str) -> list[int]:
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


# -- 4. scoring ----------------------------------------------------------------------------------------------

EDGE = set(" \t\n.,;:!?\"'`")


def reference_normalise(text: str) -> str:
    """The documented normalisation, written another way: words joined by one space, edge punctuation and
    white space dropped character by character, lower case."""
    text = " ".join(text.split())
    start, end = 0, len(text)
    while start < end and text[start] in EDGE:
        start += 1
    while end > start and text[end - 1] in EDGE:
        end -= 1
    return text[start:end].lower()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, by the textbook dynamic programme."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def reference_rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS of the lower-cased alphanumeric words over each side's word count, harmonic mean."""
    ours, theirs = re.findall(r"[a-z0-9]+", generated.lower()), re.findall(r"[a-z0-9]+", reference.lower())
    common = lcs_length(ours, theirs)
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def random_texts(count: int, alphabet: str, longest: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) for _ in range(count)]


def test_normalised_answers_match_the_documented_rule_on_random_strings() -> None:
    for text in random_texts(300, "aBz .,!?;:\t\n'\"`-", 12, seed=0):
        assert normalise_answer(text) == reference_normalise(text), repr(text)


def test_exact_match_ignores_case_spacing_and_edge_punctuation_only() -> None:
    documented = ["Paris.", "paris", " PARIS ", "U.S.", "US", "New  York!", "new york"]
    texts = [*random_texts(60, "aB .!", 5, seed=1), *documented]
    for generated in texts:
        for reference in texts:
            expected = float(reference_normalise(generated) == reference_normalise(reference))
            assert exact_match(generated, reference) == expected, (generated, reference)
            assert score_answer("exact_match", generated, reference) == expected


def test_rouge_l_is_the_lcs_f_measure_on_words() -> None:
    """Reordered words (LCS below the bag-of-words overlap), repeats, punctuation and case, no overlap, and
    random word sequences over a four-word vocabulary."""
    pairs = [
        ("the cat sat on the mat", "on the mat the cat sat"),
        ("a b c d", "d c b a"),
        ("the the the", "the"),
        ("Paris!", "paris"),
        ("It is 42, I think.", "42"),
        ("completely different", "nothing shared"),
    ]
    rng = random.Random(2)
    words = ["a", "b", "c", "d"]
    pairs += [
        (" ".join(rng.choices(words, k=rng.randint(1, 8))), " ".join(rng.choices(words, k=rng.randint(1, 8))))
        for _ in range(60)
    ]
    for generated, reference in pairs:
        expected = reference_rouge_l(generated, reference)
        assert rouge_l(generated, reference) == pytest.approx(expected, abs=1e-6), (generated, reference)
        assert score_answer("rouge_l", generated, reference) == pytest.approx(expected, abs=1e-6)
    assert {reference_rouge_l(g, r) for g, r in pairs[:6]} > {0.0, 1.0}  # the cases span 0, 1 and between


def test_an_unknown_metric_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        score_answer("bleu", "a", "a")
    named(info, "'bleu'", *METRICS)
    for metric, bad in [("bleu", "'bleu'"), (["exact_match", "rogue_l"], "'rogue_l'")]:
        with pytest.raises(ConfigError) as info:
            InstructionFormat(metric=metric)
        named(info, "data.instructions.metric", bad, *METRICS)
    with pytest.raises(ConfigError) as info:
        InstructionFormat(metric=["rouge_l"]).task_metrics([True, False])
    named(info, "data.instructions.metric lists 1 metrics for 2 tasks", "one per task")
    assert InstructionFormat().task_metrics([True, False]) == ["rouge_l", "exact_match"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"options": "some"}, ["data.instructions.options", "'some'", "'task' or 'all'"]),
        ({"answer_margin": -1}, ["data.instructions.answer_margin", "-1", ">= 0"]),
        ({"template": "Q: {question}"}, ["data.instructions.template", "'Q: {question}'", "{prompt}"]),
    ],
)
def test_bad_instruction_settings_are_named(fields: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        InstructionFormat(**fields)
    named(info, *words)


# -- 5. bad input ------------------------------------------------------------------------------------------


def test_instructions_given_to_a_classifier_are_refused() -> None:
    """data.instructions means nothing to a classifier; a language model gets the given or default format."""
    classifier = SimpleNamespace(lightning_module=ContinualClassifier(backbone_config=TINY_BERT))
    with pytest.raises(ConfigError) as info:
        instruction_format_for(InstructionFormat(), classifier)
    named(info, "data.instructions is set", "ContinualClassifier", "plan.language_model.ContinualLM")
    assert instruction_format_for(None, classifier) is None
    language_model = SimpleNamespace(lightning_module=SimpleNamespace(generative=True))
    given = InstructionFormat(metric="rouge_l")
    assert instruction_format_for(given, language_model) is given
    assert instruction_format_for(None, language_model) == InstructionFormat()


def test_a_tokenizer_without_a_chat_template_needs_a_template() -> None:
    """MiniLM's tokenizer has no chat template: the error names the tokenizer and the setting that fixes it;
    with a plain template the same data encodes."""
    tokenizer = load_tokenizer()
    examples = Examples(["name a colour"], ["answer"], responses=["blue"])
    args = (examples, {"answer": 0}, ["answer"], [0], [[0]], DataSource())
    with pytest.raises(ConfigError) as info:
        encode_instruction_examples(*args, InstructionFormat(), tokenizer, 64, "train")
    named(info, "has no chat template", tokenizer.name_or_path, "data.instructions.template", "{prompt}")
    template = "Q: {prompt}\nA: "
    data = encode_instruction_examples(*args, InstructionFormat(template=template), tokenizer, 64, "train")
    encoded = data[0]["encoded"]
    assert (
        encoded.input_ids[: encoded.prompt_length]
        == tokenizer("Q: name a colour\nA: ", add_special_tokens=False)["input_ids"]
    )


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """Writes train/test files (JSON lines for lists of dicts, else the text as is); datasets' cache under
    tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")

    def write(name: str, train: list[dict] | str, test: list[dict] | str | None = None) -> dict[str, str]:
        paths = {}
        for split, content in (("train", train), ("test", train if test is None else test)):
            path = tmp_path / f"{name}_{split}.{'csv' if isinstance(content, str) else 'jsonl'}"
            text = content if isinstance(content, str) else "".join(json.dumps(row) + "\n" for row in content)
            path.write_text(text)
            paths[split] = str(path)
        return paths

    return write


QA = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris"}]


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_a_prompt_or_response_column_that_does_not_exist_is_named(files, kind: str) -> None:
    if kind == "json":
        source = InstructionSource("json", data_files=files("qa", QA))  # default columns: prompt, response
        missing, existing = "['prompt', 'response']", "['question', 'answer']"
    else:
        data = files("qa", "question,answer\nWhat is 2 + 2?,4\nCapital of France?,Paris\n")
        source = InstructionSource("csv", prompt_column="question", response_column="anwser", data_files=data)
        missing, existing = "['anwser']", "['question', 'answer']"
    with pytest.raises(ConfigError) as info:
        source.load("train")
    named(info, f"has no column {missing}", f"its columns are {existing}", "prompt_column / response_column")
    with pytest.raises(ConfigError) as info:
        InstructionSource(kind, messages_column="messages", data_files=source.data_files).load("train")
    named(info, "has no column ['messages']", existing, "messages_column")


def test_numbers_in_a_csv_response_column_are_read_as_the_text_they_are(files) -> None:
    """A CSV column of numbers would be parsed as integers, refused as non-text, and 007 read as 7."""
    data = files("numbers", "prompt,response\nWhat is 2 + 2?,4\nBond's number?,007\n")
    examples = InstructionSource("csv", data_files=data).load("train")
    assert examples.inputs == ["What is 2 + 2?", "Bond's number?"]
    assert examples.responses == ["4", "007"]


def test_an_empty_response_is_named_with_its_row(files) -> None:
    data = files("qa", "prompt,response\nWhat is 2 + 2?,4\nCapital of France?,\nA colour?,blue\n")
    with pytest.raises(ConfigError) as info:
        InstructionSource("csv", data_files=data).load("train")
    named(info, "column 'response'", "1 empty or non-text cell(s)", "rows [2]")
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    ]
    with pytest.raises(ConfigError) as info:
        InstructionSource("json", messages_column="messages", data_files=files("chat", chats)).load("train")
    named(info, "row 2", "the assistant's last turn (the response) is empty")
    user_last = [{"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}]
    with pytest.raises(ConfigError) as info:
        InstructionSource("json", messages_column="messages", data_files=files("user", user_last)).load("train")
    named(info, "row 1", "last turn by the assistant", "['assistant', 'user']")


def test_a_long_prompt_loses_its_first_tokens_and_the_warning_says_how_many_and_where(smol) -> None:
    """Two of three free-text prompts do not fit beside their responses: each keeps the last tokens of its
    rendered prompt and its whole response, and the warning counts them and names the side cut."""
    prompts = ["Say yes.", "word " * 120, "Repeat after me: " + "la " * 90]
    answers = ["yes", "a rather long answer that must stay whole", "la"]
    examples = Examples(prompts, ["answer"] * 3, responses=answers)
    with pytest.warns(UserWarning, match=r"2 of 3 train prompts are longer than max_length=64") as record:
        data = encode_instruction_examples(
            examples, {"answer": 0}, ["answer"], [0, 0, 0], [[0]], DataSource(), InstructionFormat(), smol, 64, "train"
        )
    message = str(next(w.message for w in record if "prompts are longer" in str(w.message)))
    assert "first tokens (cut from the left)" in message and "every response was kept whole" in message
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        example = data[i]["encoded"]
        full, response = chat_ids(smol, [{"role": "user", "content": prompt}]), response_ids(smol, answer)
        kept = example.input_ids[: len(example.input_ids) - len(response)]
        assert example.input_ids[len(kept) :] == response and data[i]["reference"] == answer
        assert kept == full[len(full) - len(kept) :]  # the end of the rendered prompt
        assert example.truncated == len(full) - len(kept)
        assert len(example.input_ids) == (64 if example.truncated else len(full) + len(response))
        assert example.labels == [IGNORE] * len(kept) + response


def test_a_long_classification_text_loses_its_end_and_keeps_instruction_options_and_answer(smol) -> None:
    """The text is cut at its end to the longest prefix (in tokens) that fits; the instruction, the options and
    the answer are whole, and one more text token would not fit."""
    text = " ".join(f"word{i}" for i in range(200))
    options, instruction, answer, length = ["sport", "politics"], "What is the topic of the text?", "sport", 96
    example = encode_labelled_text(smol, text, options, instruction, answer, length, None)
    text_ids = smol(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - example.truncated
    assert 0 < keep < len(text_ids) and len(example.input_ids) <= length
    short = smol.decode(text_ids[:keep])
    assert text.startswith(short)
    prompt = classification_prompt(short, options, instruction)
    assert example.input_ids == chat_ids(smol, [{"role": "user", "content": prompt}]) + response_ids(smol, answer)
    longer = classification_prompt(smol.decode(text_ids[: keep + 1]), options, instruction)
    assert encode_instruction(smol, longer, answer, length).truncated > 0
    examples = Examples(["a short text", text], options)
    layout = ({"sport": 0, "politics": 1}, options, [0, 0], [[0, 1]])
    with pytest.warns(UserWarning, match=r"1 of 2 test texts are too long for max_length=96") as record:
        encode_instruction_examples(examples, *layout, DataSource(), InstructionFormat(), smol, length, "test")
    message = str(next(w.message for w in record if "too long" in str(w.message)))
    assert "cut at its end" in message and "the instruction and the answer are whole" in message


# -- 6. InstructionSource files through a datamodule and a real Trainer ---------------------------------------

QUESTIONS = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(4)]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": f"Say {word}."},
            {"role": "assistant", "content": f"{word}!"},
            {"role": "user", "content": "Once more, quietly."},
            {"role": "assistant", "content": f"{word}, quietly"},
        ]
    }
    for word in ["hi", "hello", "hey there"]
]


def greedy_answer(model: torch.nn.Module, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding of one unpadded prompt, stopped after end-of-sequence or ``max_new_tokens`` tokens."""
    ids, new = list(prompt), []
    with torch.no_grad():
        while len(new) < max_new_tokens and (not new or new[-1] != eos):
            new.append(int(model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax()))
            ids.append(new[-1])
    return new


def test_instruction_files_reach_the_model_rendered_by_the_chat_template(files, tmp_path: Path, smol) -> None:
    """A DatasetSequence of a prompt/response file and a chat file: one free-text task each (ROUGE-L); every
    example is the tokenizer's chat template over the user prompt, or over the chat's turns before its last,
    followed by the last assistant turn and end-of-sequence, with the loss on the response alone; and the
    answers ``plan predict`` would write equal a greedy loop over each test prompt alone."""
    source = DatasetSequence(
        {
            "qa": InstructionSource("json", data_files=files("qa", QUESTIONS, QUESTIONS[:2])),
            "chat": InstructionSource("json", messages_column="messages", data_files=files("chat", CHATS, CHATS[1:])),
        }
    )
    datamodule = TaskSequenceDataModule(source, batch_size=2, eval_batch_size=3)
    torch.manual_seed(0)
    lm = ContinualLM(backbone_config=TINY_LLAMA_LM, lora=LoRAConfig(rank=4, alpha=8))
    trainer = pl.Trainer(
        accelerator="cpu", precision="64-true", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    batches = trainer.predict(lm, datamodule=datamodule)
    assert datamodule.layout is not None
    assert datamodule.layout.task_names == ["qa", "chat"] and datamodule.layout.metrics == ["rouge_l", "rouge_l"]
    assert datamodule.tokenizer.chat_template and datamodule.pad_id == smol.pad_token_id
    rows = [[{"role": "user", "content": row["prompt"]}] for row in QUESTIONS] + [row["messages"] for row in CHATS]
    answers = [row["response"] for row in QUESTIONS] + [row["messages"][-1]["content"] for row in CHATS]
    train = datamodule._splits["train"][0]
    assert len(train) == len(rows)
    for i, (turns, answer) in enumerate(zip(rows, answers)):
        before = turns[:-1] if turns[-1]["role"] == "assistant" else turns
        prompt, response = chat_ids(smol, before), response_ids(smol, answer)
        item = train[i]
        assert item["encoded"].input_ids == prompt + response, i
        assert item["encoded"].labels == [IGNORE] * len(prompt) + response
        assert item["reference"] == answer
    first_chat = train[len(QUESTIONS)]["encoded"]
    chat_text = smol.decode(first_chat.input_ids[: first_chat.prompt_length])
    assert "Be terse." in chat_text and "hi!" in chat_text and "hi, quietly" not in chat_text
    test_rows = [[{"role": "user", "content": row["prompt"]}] for row in QUESTIONS[:2]]
    test_rows += [row["messages"][:-1] for row in CHATS[1:]]
    references = [row["response"] for row in QUESTIONS[:2]] + [row["messages"][-1]["content"] for row in CHATS[1:]]
    task_of = [0, 0, 1, 1]
    longest = [max(len(response_ids(smol, r)) for r, t in zip(references, task_of) if t == task) for task in (0, 1)]
    assert sorted(i for batch in batches for i in batch["index"]) == list(range(len(test_rows)))
    for batch in batches:  # a batch generates up to its tasks' longest reference answer plus the margin
        budget = max(longest[task_of[i]] for i in batch["index"]) + InstructionFormat().answer_margin
        for i, label, answer in zip(batch["index"], batch["label"], batch["predicted"]):
            new = greedy_answer(lm.backbone, chat_ids(smol, test_rows[i]), smol.eos_token_id, budget)
            assert (label, answer) == (references[i], smol.decode(new, skip_special_tokens=True)), i
