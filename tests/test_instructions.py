"""Instruction examples: rendering, response-only labels with left truncation of the prompt, padding, and the
response-only loss against a hand computation and against transformers' own causal-LM loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from plan.errors import ConfigError
from plan.instructions import (
    IGNORE,
    PLAIN_TEMPLATE,
    classification_prompt,
    collate_instructions,
    encode_instruction,
    render_prompt,
    response_loss,
)
from plan.models import load_tokenizer

TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 30522,
}


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's tokenizer (offline), given an end-of-sequence token as a causal LM's tokenizer has."""
    tokenizer = copy.deepcopy(load_tokenizer())
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def test_the_loss_counts_response_tokens_only_as_a_hand_computation_does() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, IGNORE], [IGNORE, 7, 8, 9, 10, 2]])
    terms = [
        -torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
        for b in range(2)
        for t in range(5)
        if labels[b, t + 1] != IGNORE
    ]
    assert len(terms) == 3 + 5
    torch.testing.assert_close(response_loss(logits, labels), torch.stack(terms).mean())


def test_the_loss_equals_transformers_causal_lm_loss_on_a_batch(tokenizer) -> None:
    """A right-padded batch of two rendered examples through a tiny random Llama: plan's loss on the logits is
    the loss transformers computes from the same labels."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA)).eval()
    examples = [
        encode_instruction(tokenizer, "name a colour", "blue", 64, PLAIN_TEMPLATE),
        encode_instruction(tokenizer, "what is two plus two, in words", "four", 64, PLAIN_TEMPLATE),
    ]
    batch = collate_instructions(examples, pad_id=tokenizer.pad_token_id)
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(response_loss(output.logits, batch["labels"]), output.loss)


def test_labels_cover_the_response_and_its_end_only(tokenizer) -> None:
    example = encode_instruction(tokenizer, "name a colour", "light blue", 64, PLAIN_TEMPLATE)
    response = tokenizer("light blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer(PLAIN_TEMPLATE.format(prompt="name a colour"), add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE] * len(prompt) + response
    assert example.truncated == 0


def test_a_long_prompt_loses_its_start_never_the_response(tokenizer) -> None:
    long_prompt = " ".join(["word"] * 100)
    example = encode_instruction(tokenizer, long_prompt, "yes", 20, PLAIN_TEMPLATE)
    response = tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(example.input_ids) == 20 and example.input_ids[-len(response) :] == response
    full = len(tokenizer(PLAIN_TEMPLATE.format(prompt=long_prompt), add_special_tokens=False)["input_ids"])
    assert example.truncated == full - (20 - len(response))
    with pytest.raises(ConfigError, match="max_length=3 leaves no room for the prompt"):
        encode_instruction(tokenizer, "q", "a much longer answer than three tokens", 3, PLAIN_TEMPLATE)


def test_bad_instruction_input_is_named(tokenizer) -> None:
    with pytest.raises(ConfigError, match="empty response"):
        encode_instruction(tokenizer, "q", "  ", 32, PLAIN_TEMPLATE)
    with pytest.raises(ConfigError, match=r"has no chat template: set data\.instructions\.template"):
        render_prompt(tokenizer, "q", None)
    with pytest.raises(ConfigError, match="has no \\{prompt\\} field"):
        render_prompt(tokenizer, "q", "Question: ")


def test_a_chat_template_renders_the_user_turn_and_the_assistant_opening(tokenizer) -> None:
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert render_prompt(chat, "hello", None) == "<user>hello</user><assistant>"
    assert render_prompt(chat, "hello", "Q: {prompt}\nA: ") == "Q: hello\nA: "  # an explicit template wins


def test_padding_is_left_out_of_the_loss(tokenizer) -> None:
    examples = [
        encode_instruction(tokenizer, "a", "b", 32, PLAIN_TEMPLATE),
        encode_instruction(tokenizer, "a longer prompt here", "b", 32, PLAIN_TEMPLATE),
    ]
    batch = collate_instructions(examples, pad_id=0)
    short = len(examples[0].input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["labels"][0, short:] == IGNORE).all()
    logits = torch.randn(*batch["input_ids"].shape, 50)
    batch["labels"][batch["labels"] >= 50] = 1  # keep the ids inside this small vocabulary
    alone = F.cross_entropy(logits[0, : short - 1], batch["labels"][0, 1:short], ignore_index=IGNORE)
    only_first = batch["labels"].clone()
    only_first[1] = IGNORE
    torch.testing.assert_close(response_loss(logits, only_first), alone)


def test_a_classification_example_becomes_an_instruction_naming_the_label_set() -> None:
    prompt = classification_prompt("the match ended 2-1", ["sport", "politics"], "What is the topic of the text?")
    assert prompt == "What is the topic of the text?\nOptions: sport, politics\nText: the match ended 2-1\nAnswer:"
