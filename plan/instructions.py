"""Instruction examples for causal language models: a prompt and a response as token ids, and the loss on the
response alone.

An example is rendered as ``prompt text + response + end-of-sequence``: the prompt text comes from the
tokenizer's chat template when it has one (the user turn, followed by the assistant's opening), or from a plain
template with a ``{prompt}`` field otherwise. The labels repeat the ids with every prompt position set to
``IGNORE``, so the next-token loss counts the response tokens only. A classification example becomes an
instruction the O-LoRA way: the instruction names the label set and the response is the label's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from plan.errors import ConfigError, require

IGNORE = -100  # the label of a position the loss leaves out (torch's cross_entropy ignore_index)
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def classification_prompt(text: str, labels: Sequence[str], instruction: str) -> str:
    """A labelled example as an instruction that names the label set, as O-LoRA turns its classification
    datasets into instructions; the expected response is the label's name."""
    return f"{instruction}\nOptions: {', '.join(labels)}\nText: {text}\nAnswer:"


Prompt = str | list[dict[str, str]]  # a text, or a chat's turns before the response ({"role", "content"} each)


def render_prompt(tokenizer: Any, prompt: Prompt, template: str | None) -> str:
    """The text that precedes the response: the chat template's turns and assistant opening when the tokenizer
    has a chat template and no ``template`` is given, else ``template`` (a ``{prompt}`` field; a chat's turns
    fill it as ``role: content`` lines)."""
    if template is None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt)
    if template is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"tokenizer '{name}' has no chat template: set data.instructions.template to a plain template with a "
            f"{{prompt}} field, e.g. {PLAIN_TEMPLATE!r}, or use a tokenizer that has one (data.tokenizer)"
        )
    require("{prompt}" in template, f"template {template!r} has no {{prompt}} field to put the prompt in")
    return template.format(prompt=prompt)


@dataclass
class EncodedInstruction:
    """One example's token ids, its labels (``IGNORE`` over the prompt) and how many prompt tokens were cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: int

    @property
    def prompt_length(self) -> int:
        """Tokens before the response (the positions labelled ``IGNORE``)."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))

    @property
    def response_length(self) -> int:
        """Tokens of the response, end-of-sequence included."""
        return len(self.input_ids) - self.prompt_length


def encode_instruction(
    tokenizer: Any, prompt: Prompt, response: str, max_length: int, template: str | None = None
) -> EncodedInstruction:
    """Token ids of ``prompt`` (rendered) + ``response`` + end-of-sequence, at most ``max_length`` of them.

    A prompt too long to fit loses its first tokens (the instruction's start) rather than the response, and
    the count of lost tokens is returned; a response that cannot fit even with an empty prompt is an error,
    never silently dropped."""
    require(response.strip() != "", f"an instruction example has an empty response (prompt {str(prompt)[:60]!r}...)")
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt, template), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    room = max_length - len(response_ids)
    if room < 1:
        raise ConfigError(
            f"max_length={max_length} leaves no room for the prompt: the response {response[:60]!r} alone takes "
            f"{len(response_ids)} tokens; raise max_length"
        )
    truncated = max(0, len(prompt_ids) - room)
    prompt_ids = prompt_ids[truncated:]
    return EncodedInstruction([*prompt_ids, *response_ids], [IGNORE] * len(prompt_ids) + response_ids, truncated)


def collate_instructions(examples: Sequence[EncodedInstruction], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` (``pad_id``), ``attention_mask`` and ``labels`` (``IGNORE`` on padding)."""
    longest = max(len(example.input_ids) for example in examples)
    batch = {
        "input_ids": torch.full((len(examples), longest), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long),
        "labels": torch.full((len(examples), longest), IGNORE, dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        batch["input_ids"][row, :n] = torch.tensor(example.input_ids)
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(example.labels)
    return batch


def response_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over the response tokens of the batch: the logits at position t
    predict the token at t + 1, and positions labelled ``IGNORE`` (prompt, padding) do not count."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


# -- scoring generated answers --------------------------------------------------------------------------------

METRICS = ("exact_match", "rouge_l")
_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`"


def normalise_answer(text: str) -> str:
    """Lower case, runs of whitespace as one space, and no punctuation at either end ("Paris." == "paris")."""
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION).lower()


def exact_match(generated: str, reference: str) -> float:
    """1.0 when the normalised answer equals the normalised reference, else 0.0."""
    return float(normalise_answer(generated) == normalise_answer(reference))


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), as torchmetrics computes it."""
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score(generated, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


def score_answer(metric: str, generated: str, reference: str) -> float:
    """One generated answer's score under ``metric`` (one of :data:`METRICS`)."""
    require(metric in METRICS, f"metric {metric!r} is not one of {METRICS}")
    return exact_match(generated, reference) if metric == "exact_match" else rouge_l(generated, reference)
