"""Examples as the tensors a model reads: token ids and a class id for a classifier, or an instruction (prompt,
response, reference answer) for a causal language model.

Both datamodules cut their data into tasks or clients by class name first and encode afterwards, through
:func:`encode_split`, so every partition and every scenario serves both kinds of model. Which kind the model is
comes from its ``generative`` attribute (:func:`instruction_format_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from plan.datamodules.sources import DataSource, Examples
from plan.errors import ConfigError, require
from plan.instructions import (
    METRICS,
    EncodedInstruction,
    classification_prompt,
    collate_instructions,
    encode_instruction,
)

TAGS = ("client", "index")  # batch entries that say where an example comes from, not what it is


# -- classifiers ----------------------------------------------------------------------------------------------


class EncodedExamples(Dataset):
    """Tokenised (or image) examples with global class ids; ``__getitem__`` gives one feature dict."""

    def __init__(self, features: dict[str, list | Tensor], labels: Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {key: values[i] for key, values in self.features.items()}
        item["labels"] = self.labels[i]
        return item


def encode_examples(examples: Examples, class_id: dict[str, int], tokenizer, max_length: int) -> EncodedExamples:
    """Token ids and attention masks (text, truncated to ``max_length``) or pixel values (images), with each
    example's class name mapped to its global id."""
    labels = torch.tensor([class_id[label] for label in examples.labels])
    if isinstance(examples.inputs, Tensor):
        return EncodedExamples({"pixel_values": examples.inputs}, labels)
    return EncodedExamples(encode_texts(examples.inputs, tokenizer, max_length), labels)


def encode_texts(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, list | Tensor]:
    """Token ids and attention masks of ``texts``, truncated to ``max_length`` tokens."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def collate(items: list[dict], pad_id: int = 0) -> dict[str, Tensor]:
    """Stack images, or right-pad token ids (with ``pad_id``) and attention masks to the longest sequence."""
    batch: dict[str, Tensor] = {"labels": torch.stack([item["labels"] for item in items])}
    add_tags(batch, items)
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
        return batch
    longest = max(len(item["input_ids"]) for item in items)
    for key in ("input_ids", "attention_mask"):
        rows = torch.full((len(items), longest), pad_id if key == "input_ids" else 0, dtype=torch.long)
        for r, item in enumerate(items):
            rows[r, : len(item[key])] = torch.as_tensor(item[key])
        batch[key] = rows
    return batch


def add_tags(batch: dict, items: list[dict]) -> None:
    for key in TAGS:
        if key in items[0]:
            batch[key] = torch.tensor([item[key] for item in items])


# -- language models ------------------------------------------------------------------------------------------


@dataclass
class InstructionFormat:
    """How the data becomes instructions for a causal language model.

    Args:
        template: a plain prompt template with a ``{prompt}`` field; ``None`` renders the prompt with the
            tokenizer's chat template (an error if it has none).
        options: the label names a classification instruction lists: those of the example's ``task`` (as O-LoRA
            lists each dataset's labels), or ``all`` the classes of the sequence.
        metric: how generated answers are scored: one of ``exact_match`` (after case and whitespace
            normalisation) and ``rouge_l``, for every task or as a list with one per task; ``null`` scores
            classification tasks by exact match and free-text ones by ROUGE-L.
        answer_margin: generation stops after the task's longest reference answer plus this many tokens.
    """

    template: str | None = None
    options: str = "task"
    metric: str | list[str] | None = None
    answer_margin: int = 8

    def __post_init__(self) -> None:
        require(
            self.options in ("task", "all"), f"data.instructions.options must be 'task' or 'all', got {self.options!r}"
        )
        require(
            self.answer_margin >= 0, f"data.instructions.answer_margin must be >= 0 tokens, got {self.answer_margin}"
        )
        if self.template is not None:
            require(
                "{prompt}" in self.template,
                f"data.instructions.template {self.template!r} has no {{prompt}} field to put the prompt in",
            )
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric or []
        bad = [m for m in metrics if m not in METRICS]
        require(not bad, f"data.instructions.metric {bad[0] if bad else ''!r} is not one of {METRICS}")

    def task_metrics(self, free_text: list[bool]) -> list[str]:
        """The metric of each task, given which tasks answer in free text."""
        if isinstance(self.metric, list):
            require(
                len(self.metric) == len(free_text),
                f"data.instructions.metric lists {len(self.metric)} metrics for {len(free_text)} tasks; give one per "
                "task, or one name for all",
            )
            return list(self.metric)
        if isinstance(self.metric, str):
            return [self.metric] * len(free_text)
        return ["rouge_l" if text else "exact_match" for text in free_text]


torch.serialization.add_safe_globals([InstructionFormat])


class InstructionExamples(Dataset):
    """Encoded instructions with what evaluation needs beside them: each example's class id (``labels``, as
    for :class:`EncodedExamples`, so partitions and histograms work unchanged), its reference answer, and the
    generation budget of its task (longest reference answer in tokens plus the margin)."""

    def __init__(
        self, encoded: list[EncodedInstruction], labels: Tensor, references: list[str], budgets: list[int]
    ) -> None:
        self.encoded, self.labels, self.references, self.budgets = encoded, labels, references, budgets

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return {"encoded": self.encoded[i], "classes": self.labels[i], "reference": self.references[i],
                "budget": self.budgets[i]}  # fmt: skip


def encode_instruction_examples(
    examples: Examples,
    class_id: dict[str, int],
    class_names: list[str],
    task_of: list[int],
    task_classes: list[list[int]],
    source: DataSource,
    instructions: InstructionFormat,
    tokenizer: Any,
    max_length: int,
    split: str,
) -> InstructionExamples:
    """Each example as an instruction: its own prompt and response, or (a labelled text) the source's
    instruction with the label set and the label's name as the answer. ``task_of`` gives each example's task,
    whose classes are the options listed and whose longest answer bounds generation."""
    require(not isinstance(examples.inputs, Tensor), "a language model reads text: this source gives images (tensors)")
    texts: list[str] = list(examples.inputs)  # text, checked just above
    every = [source.label_text(name) for name in class_names]
    options = [[source.label_text(class_names[c]) for c in classes] for classes in task_classes]
    encoded, references, shortened, cut_prompts = [], [], 0, 0
    for i, label in enumerate(examples.labels):
        response = examples.responses[i] if examples.responses is not None else None
        chat = examples.chats[i] if examples.chats is not None else None
        if response is None:
            listed = every if instructions.options == "all" else options[task_of[i]]
            response = source.label_text(label)
            example = encode_labelled_text(
                tokenizer, texts[i], listed, source.instruction_for(label), response, max_length, instructions.template
            )
            shortened += example.truncated > 0
        else:
            prompt = chat if chat is not None else texts[i]
            example = encode_instruction(tokenizer, prompt, response, max_length, instructions.template)
            cut_prompts += example.truncated > 0
        encoded.append(example)
        references.append(response)
    if shortened:
        rank_zero_warn(
            f"{shortened} of {len(encoded)} {split} texts are too long for max_length={max_length} beside their "
            "instruction, options and answer: each was cut at its end to fit; the instruction and the answer are "
            "whole. Raise max_length to keep whole texts."
        )
    if cut_prompts:
        rank_zero_warn(
            f"{cut_prompts} of {len(encoded)} {split} prompts are longer than max_length={max_length} allows beside "
            f"their response: each lost its first tokens (cut from the left), and every response was kept whole. "
            "Raise max_length to keep whole prompts."
        )
    longest = [0] * len(task_classes)
    for e, task in zip(encoded, task_of):
        longest[task] = max(longest[task], e.response_length)
    budgets = [longest[task] + instructions.answer_margin for task in task_of]
    labels = torch.tensor([class_id[label] for label in examples.labels])
    return InstructionExamples(encoded, labels, references, budgets)


def encode_labelled_text(
    tokenizer: Any, text: str, options: list[str], instruction: str, answer: str, max_length: int, template: str | None
) -> EncodedInstruction:
    """A labelled text as an instruction (:func:`plan.instructions.classification_prompt`) of at most
    ``max_length`` tokens: a text too long to fit is cut at its end, so that the instruction, the options and
    the answer stay whole. ``truncated`` is the number of text tokens cut."""
    example = encode_instruction(
        tokenizer, classification_prompt(text, options, instruction), answer, max_length, template
    )
    if not example.truncated:
        return example
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - example.truncated
    while keep > 0:  # a cut can merge tokens differently at its edge: shorten until the whole prompt fits
        short = tokenizer.decode(ids[:keep])
        example = encode_instruction(
            tokenizer, classification_prompt(short, options, instruction), answer, max_length, template
        )
        if not example.truncated:
            return EncodedInstruction(example.input_ids, example.labels, len(ids) - keep)
        keep -= max(1, example.truncated)
    raise ConfigError(
        f"max_length={max_length} leaves no room for any text beside the instruction {instruction!r}, the options "
        f"{options} and the answer {answer!r}; raise max_length"
    )


def collate_instruction_batch(items: list[dict], pad_id: int = 0) -> dict[str, Any]:
    """Training inputs (right-padded ``input_ids``, ``attention_mask``, response-only ``labels``) and what
    generation needs: the prompts left-padded (``prompt_ids``, ``prompt_mask``) so that every row's answer
    starts at the same position, the references, the class ids and the batch's token budget."""
    encoded: list[EncodedInstruction] = [item["encoded"] for item in items]
    batch: dict[str, Any] = collate_instructions(encoded, pad_id)
    prompts = [e.input_ids[: e.prompt_length] for e in encoded]
    longest = max(len(p) for p in prompts)
    batch["prompt_ids"] = torch.full((len(items), longest), pad_id, dtype=torch.long)
    batch["prompt_mask"] = torch.zeros(len(items), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch["prompt_ids"][row, longest - len(prompt) :] = torch.tensor(prompt)
        batch["prompt_mask"][row, longest - len(prompt) :] = 1
    batch["classes"] = torch.stack([torch.as_tensor(item["classes"]) for item in items])
    batch["references"] = [item["reference"] for item in items]
    batch["max_new_tokens"] = max(item["budget"] for item in items)
    add_tags(batch, items)
    return batch


# -- what both datamodules call -------------------------------------------------------------------------------


def instruction_format_for(requested: InstructionFormat | None, trainer: pl.Trainer | None) -> InstructionFormat | None:
    """The instruction format when the model generates text (the given one, or the default), else ``None``; a
    format given for a classifier is an error, since a classifier reads no instructions."""
    model = trainer.lightning_module if trainer is not None else None
    generative = bool(getattr(model, "generative", False))
    if requested is not None and not generative and model is not None:
        raise ConfigError(
            f"data.instructions is set, but model {type(model).__name__} is a classifier, which reads no instructions; "
            "use model plan.language_model.ContinualLM, or drop data.instructions"
        )
    return (requested or InstructionFormat()) if generative else None


def encode_split(
    examples: Examples,
    class_names: list[str],
    task_of: list[int],
    task_classes: list[list[int]],
    source: DataSource,
    instructions: InstructionFormat | None,
    tokenizer: Any,
    max_length: int,
    split: str,
) -> EncodedExamples | InstructionExamples:
    """Encode a split for a classifier (``instructions`` is None) or as instructions for a language model."""
    class_id = {name: i for i, name in enumerate(class_names)}
    if instructions is None:
        return encode_examples(examples, class_id, tokenizer, max_length)
    return encode_instruction_examples(
        examples, class_id, class_names, task_of, task_classes, source, instructions, tokenizer, max_length, split
    )


def collate_fn(instructions: InstructionFormat | None, pad_id: int) -> Callable[[list[dict]], dict]:
    """The batch builder of the data's encoding."""
    return partial(collate if instructions is None else collate_instruction_batch, pad_id=pad_id)
