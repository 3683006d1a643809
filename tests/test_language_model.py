"""The language-model path against independent references: the response-only loss against a per-example hand
computation, plan's LoRA layers against PEFT's on the same weights (tiny Llama, and GPT-2 whose ``Conv1D``
plan rebuilds as ``nn.Linear``), batched left-padded generation against a greedy loop over each prompt alone,
and bad models refused, also by the real ``plan fit`` command.

Every model is a tiny random-weight one built from a config; the tokenizer is the embedded SmolLM2's (offline).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import TINY_BERT, TINY_LLAMA_LM
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from plan.datamodules.encoding import collate_instruction_batch
from plan.errors import ConfigError
from plan.instructions import IGNORE, encode_instruction
from plan.language_model import ContinualLM
from plan.lora import LoRAConfig, is_conv1d
from plan.models import EMBEDDED_SMOLLM, load_causal_lm, load_tokenizer

VOCAB = 49152  # SmolLM2's tokenizer
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 256,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2}
MODELS = pytest.mark.parametrize("config", [TINY_LLAMA_LM, TINY_GPT2], ids=["llama", "gpt2"])

PAIRS = [  # prompts of different lengths, each with its reference answer
    ("Name a colour.", "Blue"),
    ("What is two plus two? Answer in words, and keep the answer short please.", "four"),
    ("Hi", "Hello there, how can I help?"),
]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(EMBEDDED_SMOLLM)


def tiny_lm(config: dict, seed: int = 0, **lora) -> ContinualLM:
    """A tiny random ContinualLM whose LoRA slots hold random non-zero factors (a fresh slot has B = 0)."""
    torch.manual_seed(seed)
    lm = ContinualLM(backbone_config=config, lora=LoRAConfig(**{"rank": 4, "alpha": 8, **lora}))
    with torch.no_grad():
        for layer in lm.lora_layers.values():
            layer.lora_B.normal_(0, 0.5)
    return lm


def instruction_items(tokenizer, pairs: list[tuple[str, str]], budget: int = 6) -> list[dict]:
    """Dataset items as :class:`plan.datamodules.encoding.InstructionExamples` gives them, rendered with the
    tokenizer's chat template."""
    items = []
    for prompt, answer in pairs:
        encoded = encode_instruction(tokenizer, prompt, answer, 256)
        items.append({"encoded": encoded, "classes": 0, "reference": answer, "budget": budget})
    return items


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the tokenizer's own chat template renders it, with the assistant's opening."""
    turns = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- 1. the loss --------------------------------------------------------------------------------------------


@MODELS
def test_task_loss_is_the_mean_log_loss_of_the_response_tokens_of_each_example_alone(config: dict, smol) -> None:
    """A right-padded batch of three instructions of different lengths: ContinualLM's loss is the mean, over
    every response token (end-of-sequence included) of every example, of -log p(token | all before it), each
    example run alone without padding. The padding is end-of-sequence, so counting it would change the mean.
    (Eval mode: GPT-2's own dropout would draw other masks in the two computations.)"""
    lm = tiny_lm(config).eval()
    batch = collate_instruction_batch(instruction_items(smol, PAIRS), pad_id=smol.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and smol.pad_token_id == smol.eos_token_id
    terms: list[Tensor] = []
    for prompt, answer in PAIRS:
        response = [*smol(answer, add_special_tokens=False)["input_ids"], smol.eos_token_id]
        ids = chat_prompt_ids(smol, prompt) + response
        logits = lm.backbone(input_ids=torch.tensor([ids])).logits[0]
        for t in range(len(ids) - len(response) - 1, len(ids) - 1):  # positions whose next token is the response's
            terms.append(-torch.log_softmax(logits[t], -1)[ids[t + 1]])
    assert len(terms) == int((batch["labels"] != IGNORE).sum())
    loss = lm.task_loss(batch)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
    loss.backward()
    trained = {name for name, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(name.endswith(("lora_A", "lora_B")) for name in trained), sorted(trained)[:4]


# -- 2. LoRA against PEFT ------------------------------------------------------------------------------------


def peft_lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by the module name they have in the base model."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def copy_frozen_weights(plan_backbone: nn.Module, peft_model: nn.Module) -> None:
    """Give the PEFT model's base the weights of plan's backbone; a GPT-2 ``Conv1D`` keeps its weight as
    (in, out), the ``nn.Linear`` plan rebuilt it as keeps (out, in)."""
    ours = plan_backbone.state_dict()
    base = peft_model.get_base_model()
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            module = base.get_submodule(name.rpartition(".")[0])
            converted = is_conv1d(module) and ".base_layer." in name and name.endswith(".weight")
            tensor.copy_(ours[name].T if converted else ours[name])


@pytest.mark.parametrize(
    ("config", "targets"), [(TINY_LLAMA_LM, ["q_proj", "v_proj"]), (TINY_GPT2, ["c_attn"])], ids=["llama", "gpt2"]
)
def test_lora_forward_equals_peft_on_the_same_weights(config: dict, targets: list[str]) -> None:
    """The same frozen weights and the same non-zero A and B in plan's layers and in PEFT's (scale alpha / r):
    the logits agree; without the adapters PEFT's are far from them, so the comparison sees the adapters."""
    lm = tiny_lm(config, rank=4, alpha=12, target_modules=targets).eval()
    reference = get_peft_model(
        load_causal_lm(config=config), LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=targets)
    ).eval()
    theirs = peft_lora_layers(reference)
    assert sorted(theirs) == sorted(lm.lora_layers)
    copy_frozen_weights(lm.backbone, reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lm.lora_layers.items():
            a, b = torch.randn(layer.lora_A.shape, generator=g), torch.randn(layer.lora_B.shape, generator=g)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            theirs[name].lora_A["default"].weight.copy_(a)
            theirs[name].lora_B["default"].weight.copy_(b)
            assert layer.scale == theirs[name].scaling["default"] == 12 / 4
    input_ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    with torch.no_grad():
        ours = lm({"input_ids": input_ids, "attention_mask": attention_mask})
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        with reference.disable_adapter():
            frozen = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - frozen).abs().max() > 1e-2


@MODELS
def test_default_target_modules_are_pefts_defaults(config: dict) -> None:
    """LoRAConfig() leaves target_modules None: plan adapts exactly the modules PEFT adapts by default."""
    lm = ContinualLM(backbone_config=config, lora=LoRAConfig())
    reference = get_peft_model(load_causal_lm(config=config), LoraConfig())
    assert sorted(lm.lora_layers) == sorted(peft_lora_layers(reference))
    assert {name.rsplit(".", 1)[-1] for name in lm.lora_layers} == set(reference.peft_config["default"].target_modules)


# -- 3. generation -------------------------------------------------------------------------------------------


def greedy(model: nn.Module, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding of one unpadded prompt: the argmax of the last position's logits, appended, until
    end-of-sequence (kept) or ``max_new_tokens``."""
    ids, new = list(prompt), []
    with torch.no_grad():
        while len(new) < max_new_tokens:
            token = int(model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            ids.append(token)
    return new


def attach_data(lm: ContinualLM, tokenizer) -> None:
    """What generate_answers reads from its trainer: the datamodule's tokenizer and padding id."""
    datamodule = SimpleNamespace(tokenizer=tokenizer, pad_id=tokenizer.pad_token_id)
    lm.trainer = SimpleNamespace(datamodule=datamodule)


@MODELS
def test_batched_generation_equals_a_greedy_loop_over_each_prompt_alone(config: dict, smol) -> None:
    """Three prompts of different lengths, left-padded into one batch: the answers equal greedy decoding of
    each prompt alone, unpadded, stopped at end-of-sequence or at the batch's token budget. End-of-sequence is
    made the most likely token wherever the first row's third generated token was (its output row becomes that
    token's, scaled by 1.01), so that some answers stop early and others run to the budget. Double precision
    keeps argmax near-ties out of the comparison; position ids shifted by the padding would change the answers."""
    lm = tiny_lm(config).eval().double()
    budget, eos = 6, smol.eos_token_id
    batch = collate_instruction_batch(instruction_items(smol, PAIRS, budget), pad_id=smol.pad_token_id)
    prompts = [chat_prompt_ids(smol, prompt) for prompt, _ in PAIRS]
    width = batch["prompt_ids"].shape[1]
    for row, prompt in enumerate(prompts):  # left padding: each prompt ends at the last column
        assert batch["prompt_ids"][row, width - len(prompt) :].tolist() == prompt
        assert batch["prompt_mask"][row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
    assert len({len(p) for p in prompts}) == 3
    third = greedy(lm.backbone, prompts[0], eos, budget)[2]
    head = lm.backbone.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())  # untied: the prompts' end-of-turn tokens keep theirs
    with torch.no_grad():
        head.weight[eos] = 1.01 * head.weight[third]
    expected = [greedy(lm.backbone, prompt, eos, budget) for prompt in prompts]
    assert any(ids[-1] == eos and len(ids) < budget for ids in expected), expected
    assert any(len(ids) == budget and eos not in ids for ids in expected), expected
    attach_data(lm, smol)
    answers = lm.generate_answers(batch)
    assert answers == smol.batch_decode(expected, skip_special_tokens=True)
    assert any(answers)


# -- 5. models that are no decoder ---------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "model_type"), [(TINY_BERT, "bert"), (TINY_T5, "t5")], ids=["bert", "t5"])
def test_a_model_that_is_not_a_decoder_is_refused(config: dict, model_type: str) -> None:
    with pytest.raises(ConfigError) as info:
        ContinualLM(backbone_config=config)
    for word in [f"model_type '{model_type}'", "not a decoder-only causal language model", "'llama'", "'gpt2'"]:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


# -- 5. bad settings through the plan command ---------------------------------------------------------------

SYNTHETIC = {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 4, "train_per_class": 2}}


def run_config(model: dict, data: dict) -> dict:
    """A one-task run of a tiny model on synthetic data, as ``plan fit`` reads it."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "plan.callbacks.TaskSequencer"}],
        },
        "model": model,
        "data": {
            "class_path": "plan.datamodules.TaskSequenceDataModule",
            "init_args": {"source": SYNTHETIC, "classes_per_task": 2, **data},
        },
    }


LM = {"class_path": "plan.language_model.ContinualLM", "init_args": {"backbone_config": TINY_LLAMA_LM}}
CLASSIFIER = {"class_path": "plan.module.ContinualClassifier", "init_args": {"backbone_config": TINY_BERT}}


@pytest.mark.parametrize(
    ("model", "data", "named"),
    [
        (
            LM,
            {"tokenizer": "embedded:all-MiniLM-L6-v2"},
            ["has no chat template", "data.instructions.template", "{prompt}", "data.tokenizer"],
        ),
        (
            CLASSIFIER,
            {"instructions": {"metric": "exact_match"}},
            ["data.instructions is set", "ContinualClassifier", "plan.language_model.ContinualLM"],
        ),
        (
            {**LM, "init_args": {"backbone_config": TINY_BERT}},
            {},
            ["model_type 'bert'", "not a decoder-only causal language model", "'llama'"],
        ),
        (LM, {"instructions": {"metric": "bleu"}}, ["data.instructions.metric", "'bleu'", "'exact_match'", "rouge_l"]),
    ],
    ids=["no-chat-template", "classifier-instructions", "bert-lm", "bad-metric"],
)
def test_plan_fit_answers_a_bad_language_model_setting_in_one_line(
    tmp_path: Path, model: dict, data: dict, named: list[str]
) -> None:
    """The real command in a child process: exit status 2, one ``plan: error:`` line naming the bad value and
    what is valid, no traceback, nothing trained."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(model, data)))
    plan = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    child = subprocess.run(
        [*plan.split(), "fit", "--config", str(config)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert child.returncode == 2, child.stderr[-3000:]
    assert "Traceback" not in child.stderr
    (line,) = [line for line in child.stderr.splitlines() if line.startswith("plan: error:")]
    for word in named:
        assert word in line, f"{word!r} not in: {line}"
    assert not list(tmp_path.rglob("*.ckpt"))
