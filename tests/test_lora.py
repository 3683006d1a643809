"""The LoRA core (``plan.lora``) checked against independent references: PEFT and plain-torch formulas.

Every model here is a tiny randomly initialised ``BertModel`` built from a config (no downloads).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from plan.lora import (
    LoRAConfig,
    LoRALinear,
    export_peft,
    inject_lora,
    load_adapters,
    lora_layers,
    save_adapters,
)

RANK, ALPHA = 4, 8.0
HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 100
PEFT_PREFIX = "base_model.model."
ATOL, RTOL = 1e-5, 1e-5
QUERY = "encoder.layer.0.attention.self.query"

# PEFT on transformers 5 calls a deprecated alias; not this code's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# --------------------------------------------------------------------------------------------- helpers


def tiny_bert(seed: int = 0) -> BertModel:
    """A 2-layer BERT with random weights and no dropout, in eval mode (deterministic forward)."""
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def lora_config(targets: list[str] | str | None = None, rank: int = RANK) -> LoRAConfig:
    return LoRAConfig(rank=rank, alpha=ALPHA, dropout=0.0, target_modules=targets or ["query", "value"])


def peft_model(base: nn.Module, targets: list[str] | str | None = None) -> peft.PeftModel:
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets or ["query", "value"], lora_dropout=0.0)
    return peft.get_peft_model(base, config).eval()


def peft_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers keyed by the module name in the *base* model (prefix stripped)."""
    return {n.removeprefix(PEFT_PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def randomize_slots(model: nn.Module, generator: torch.Generator) -> None:
    """Give every trainable slot 'trained-looking' values: random A and a clearly non-zero B."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)


def encode(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).last_hidden_state


@pytest.fixture
def batch() -> dict[str, Tensor]:
    """Random token ids with a padded second sequence."""
    g = torch.Generator().manual_seed(123)
    input_ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


# ------------------------------------------------------------------------------------ 1. PEFT parity


def test_forward_and_gradients_match_peft(batch: dict[str, Tensor], gen: torch.Generator) -> None:
    """Same A, B (B non-zero) in plan and PEFT give the same hidden states and the same A/B gradients."""
    base = tiny_bert()
    base_out = encode(base, batch).detach()
    ours, theirs = copy.deepcopy(base), peft_model(copy.deepcopy(base))
    ours_layers = inject_lora(ours, lora_config())
    theirs_layers = peft_layers(theirs)
    assert set(ours_layers) == set(theirs_layers)

    randomize_slots(ours, gen)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            theirs_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            theirs_layers[name].lora_B["default"].weight.copy_(layer.lora_B)

    out_ours, out_theirs = encode(ours, batch), encode(theirs, batch)
    assert not torch.allclose(out_ours, base_out, atol=1e-3), (
        "the adapters must change the output for parity to mean anything"
    )
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=RTOL)

    weights = torch.randn(out_ours.shape, generator=gen)
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    for name, layer in ours_layers.items():
        ref = theirs_layers[name]
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
        torch.testing.assert_close(layer.lora_A.grad, ref.lora_A["default"].weight.grad, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(layer.lora_B.grad, ref.lora_B["default"].weight.grad, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ 2. target matching


@pytest.mark.parametrize(
    "targets",
    [
        ["query", "value"],
        ["dense"],
        ["self.query", "output.dense"],
        ["query", "ense"],  # a partial name part ("ense" of "dense") matches nothing
        ["encoder.layer.1.attention.self.key", "intermediate.dense"],
        r".*\.attention\.self\.(query|key)",
        r"encoder\.layer\.0\..*dense",
    ],
)
def test_targets_match_peft(targets: list[str] | str) -> None:
    """plan wraps exactly the modules PEFT wraps, for suffix lists and for a full-match regex string."""
    ours, theirs = tiny_bert(), peft_model(tiny_bert(), targets)
    wrapped = set(inject_lora(ours, lora_config(targets)))
    assert wrapped == set(lora_layers(ours))
    assert wrapped == set(peft_layers(theirs))
    assert wrapped  # the case is not vacuous


def test_regex_in_a_list_is_a_full_match() -> None:
    """A list entry with regex characters must match the whole module name, not just a part of it."""
    linears = [n for n, m in tiny_bert().named_modules() if isinstance(m, nn.Linear)]
    pattern = r"encoder\.layer\.1\..*(query|value)"
    wrapped = set(inject_lora(tiny_bert(), lora_config([pattern])))
    assert wrapped == {n for n in linears if re.fullmatch(pattern, n)}
    assert len(wrapped) == 2
    with pytest.raises(ValueError):  # re.search would find these; a full match does not
        inject_lora(tiny_bert(), lora_config([r"layer\.1\..*query"]))


# ------------------------------------------------------------------------------- 3. merge / unmerge


def test_merge_unmerge(batch: dict[str, Tensor], gen: torch.Generator) -> None:
    """Merging keeps the output, adds the adapter once, and unmerging restores the base weight."""
    model = tiny_bert()
    layers = inject_lora(model, lora_config())
    randomize_slots(model, gen)
    for layer in layers.values():  # a non-empty frozen stack must be merged too
        layer.freeze_slot()
    randomize_slots(model, gen)
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    expected = encode(model, batch).detach()

    for layer in layers.values():
        layer.merge()
    merged_out = encode(model, batch).detach()
    torch.testing.assert_close(merged_out, expected, atol=ATOL, rtol=RTOL)
    for name, layer in layers.items():
        delta = layer.scale * layer.lora_B @ layer.lora_A + layer.past_B @ layer.past_A
        assert delta.abs().max() > 1e-2
        torch.testing.assert_close(layer.base_layer.weight, originals[name] + delta, atol=1e-6, rtol=0)
        # A merged layer is just its (updated) base layer: the adapter is not added a second time.
        x = torch.randn(3, layer.in_features, generator=gen)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, originals[name] + delta, layer.base_layer.bias))

    with pytest.raises(RuntimeError):
        layers[QUERY].merge()
    with pytest.raises(RuntimeError):
        layers[QUERY].freeze_slot()

    for layer in layers.values():
        layer.unmerge()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(encode(model, batch), expected, atol=ATOL, rtol=RTOL)
    with pytest.raises(RuntimeError):
        layers[QUERY].unmerge()


# ------------------------------------------------------------------------------ 4. freeze / reset


def test_freeze_and_reset_keep_output_and_parameters(gen: torch.Generator) -> None:
    """Freezing moves the slot into the stack and resetting zeroes B: the output never changes, the
    trainable Parameter objects survive, and the layer equals a hand-written plain-torch formula."""
    model = tiny_bert()
    layer = inject_lora(model, lora_config())[QUERY]
    param_a, param_b = layer.lora_A, layer.lora_B
    s = ALPHA / RANK
    x = torch.randn(2, 5, HIDDEN, generator=gen)
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()

    def hand(slot: tuple[Tensor, Tensor], finished: list[tuple[Tensor, Tensor]]) -> Tensor:
        """x W^T + b + s x A^T B^T + sum over finished adapters of s x A_i^T B_i^T."""
        y = x @ W.T + b + s * (x @ slot[0].T @ slot[1].T)
        for a_i, b_i in finished:
            y = y + s * (x @ a_i.T @ b_i.T)
        return y

    finished: list[tuple[Tensor, Tensor]] = []
    for task in range(2):
        randomize_slots(model, gen)
        slot = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        before = layer(x).detach()
        torch.testing.assert_close(before, hand(slot, finished), atol=ATOL, rtol=RTOL)

        layer.freeze_slot()
        layer.reset_slot()
        finished.append(slot)
        torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=RTOL)
        assert torch.count_nonzero(layer.lora_B) == 0
        assert not torch.equal(layer.lora_A, slot[0])
        assert layer.past_rank == (task + 1) * RANK
        assert layer.lora_A is param_a and layer.lora_B is param_b

    # The stack holds the raw A's and the scale-folded B's, as buffers (not parameters).
    torch.testing.assert_close(layer.past_A, torch.cat([a for a, _ in finished], dim=0))
    torch.testing.assert_close(layer.past_B, torch.cat([s * b_i for _, b_i in finished], dim=1))
    assert "past_A" not in dict(layer.named_parameters()) and "past_A" in dict(layer.named_buffers())
    # The brief's formula with the stack as one product.
    randomize_slots(model, gen)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    formula = x @ W.T + b + s * (x @ A.T @ B.T) + x @ layer.past_A.T @ layer.past_B.T
    torch.testing.assert_close(layer(x), formula, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer(x), hand((A, B), finished), atol=ATOL, rtol=RTOL)


def test_scale_matches_peft() -> None:
    """``LoRAConfig.scale`` and every layer's scale equal PEFT's ``scaling`` (alpha / r)."""
    config = lora_config()
    layers = inject_lora(tiny_bert(), config)
    reference = peft_layers(peft_model(tiny_bert()))
    for name, layer in layers.items():
        assert layer.scale == config.scale == reference[name].scaling["default"]


# ------------------------------------------------------------------------------------ 5. init


def test_reset_slot_matches_peft_init() -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT's kaiming_uniform_(a=sqrt(5)), B = 0; seeded resets repeat."""
    layer = LoRALinear(nn.Linear(HIDDEN, INTERMEDIATE), rank=RANK, alpha=ALPHA)
    # Independent reference bound: torch's own kaiming_uniform_ formula, gain * sqrt(3 / fan_in).
    bound = nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / HIDDEN)
    peft_layer = peft_layers(peft_model(nn.Sequential(nn.Linear(HIDDEN, INTERMEDIATE)), ["0"]))["0"]
    peft_a = peft_layer.lora_A["default"].weight
    assert peft_a.abs().max() <= bound + 1e-7 and torch.count_nonzero(peft_layer.lora_B["default"].weight) == 0

    layer.reset_slot(torch.Generator().manual_seed(0))
    first = layer.lora_A.detach().clone()
    assert first.shape == peft_a.shape
    assert first.abs().max() <= bound + 1e-7
    assert first.abs().max() > 0.9 * bound  # the full range is used, not a narrower one (128 samples)
    assert torch.count_nonzero(layer.lora_B) == 0

    layer.reset_slot(torch.Generator().manual_seed(0))
    assert torch.equal(layer.lora_A, first)
    layer.reset_slot(torch.Generator().manual_seed(1))
    assert not torch.equal(layer.lora_A, first)


# ------------------------------------------------------------------------------- 6. save / load


def staged_model(base: BertModel, freezes: int, gen: torch.Generator, targets: list[str] | None = None) -> nn.Module:
    """``base`` copied, injected, with ``freezes`` finished adapters in its stack and a random slot."""
    model = copy.deepcopy(base)
    inject_lora(model, lora_config(targets))
    for _ in range(freezes):
        randomize_slots(model, gen)
        for layer in lora_layers(model).values():
            layer.freeze_slot()
    randomize_slots(model, gen)
    return model


def test_save_load_round_trip(tmp_path: Path, batch: dict[str, Tensor], gen: torch.Generator) -> None:
    """An adapter file restores slot and stack (resized) into a fresh injection, with identical output
    and the trainable Parameter objects kept."""
    base = tiny_bert()
    source = staged_model(base, freezes=2, gen=gen)
    path = tmp_path / "adapters.safetensors"
    save_adapters(source, path)

    target = staged_model(base, freezes=0, gen=gen)
    params = {n: (layer.lora_A, layer.lora_B) for n, layer in lora_layers(target).items()}
    assert not torch.allclose(encode(target, batch), encode(source, batch), atol=1e-3)
    load_adapters(target, path)
    torch.testing.assert_close(encode(target, batch), encode(source, batch), atol=ATOL, rtol=RTOL)
    for name, layer in lora_layers(target).items():
        assert layer.past_rank == 2 * RANK
        assert layer.lora_A is params[name][0] and layer.lora_B is params[name][1]


def test_load_into_different_targets_fails(tmp_path: Path, gen: torch.Generator) -> None:
    """A file from other targets is refused, naming the missing and unexpected keys."""
    base = tiny_bert()
    path = tmp_path / "adapters.safetensors"
    save_adapters(staged_model(base, freezes=1, gen=gen), path)
    other = staged_model(base, freezes=0, gen=gen, targets=["query", "key"])
    with pytest.raises(ValueError, match=r"missing .*key.*unexpected .*value"):
        load_adapters(other, path)


@pytest.mark.parametrize(("source_freezes", "target_freezes"), [(2, 0), (0, 1), (1, 2)])
def test_load_state_dict_resizes_stack(
    source_freezes: int, target_freezes: int, batch: dict[str, Tensor], gen: torch.Generator
) -> None:
    """``model.load_state_dict`` (strict) works whatever the two frozen-stack sizes are."""
    base = tiny_bert()
    source = staged_model(base, source_freezes, gen)
    target = staged_model(base, target_freezes, gen)
    target.load_state_dict(source.state_dict())
    for layer in lora_layers(target).values():
        assert layer.past_rank == source_freezes * RANK
    torch.testing.assert_close(encode(target, batch), encode(source, batch), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------- 7. PEFT export


@pytest.mark.parametrize("uneven", [False, True], ids=["same-rank", "per-layer-rank"])
def test_export_peft_reloads_in_peft(
    uneven: bool, tmp_path: Path, batch: dict[str, Tensor], gen: torch.Generator
) -> None:
    """A PEFT adapter exported from slot + stack reproduces plan's output in ``PeftModel.from_pretrained``;
    with uneven stacks, ``rank_pattern``/``alpha_pattern`` keep every layer's scale at 1."""
    base = tiny_bert()
    model = staged_model(base, freezes=1, gen=gen)
    if uneven:  # one more finished adapter in the last layer only: ranks differ across layers
        lora_layers(model)["encoder.layer.1.attention.self.value"].freeze_slot()
        randomize_slots(model, gen)
    expected = encode(model, batch).detach()
    assert not torch.allclose(expected, encode(base, batch), atol=1e-3)

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 * RANK
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert bool(config["rank_pattern"]) == uneven

    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ref_layers = peft_layers(reloaded)
    assert set(ref_layers) == set(lora_layers(model))
    for name, layer in lora_layers(model).items():
        assert ref_layers[name].scaling["default"] == 1.0
        assert ref_layers[name].r["default"] == layer.past_rank + layer.rank
    torch.testing.assert_close(encode(reloaded, batch), expected, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------ 8. errors


@pytest.mark.parametrize(
    ("target", "limit"),
    [
        ("encoder.layer.0.attention.self.query", HIDDEN),
        ("encoder.layer.0.intermediate.dense", HIDDEN),
        ("encoder.layer.0.output.dense", HIDDEN),
    ],
)
@pytest.mark.parametrize("offset", ["zero", "negative", "too-big"])
def test_bad_rank_is_refused(target: str, limit: int, offset: str) -> None:
    """Ranks outside 1..min(in, out) raise a ValueError naming the layer and the valid range."""
    rank = {"zero": 0, "negative": -2, "too-big": limit + 1}[offset]
    with pytest.raises(ValueError, match=re.escape(target) + r".*" + re.escape(f"1..{limit}")):
        inject_lora(tiny_bert(), lora_config([target], rank=rank))
    assert inject_lora(tiny_bert(), lora_config([target], rank=limit))[target].rank == limit


def test_unmatched_targets_list_available_suffixes() -> None:
    """Targets matching no linear layer raise a ValueError that lists the layers' suffixes."""
    model = tiny_bert()
    with pytest.raises(ValueError) as info:
        inject_lora(model, lora_config(["qeury"]))
    for suffix in ("query", "key", "value", "dense"):
        assert repr(suffix) in str(info.value)
    assert not lora_layers(model)


# ---------------------------------------------------------------------------------- 9. freezing


def test_only_lora_slots_train() -> None:
    """After injection every base parameter is frozen and exactly the slots' A and B require grad."""
    model = tiny_bert()
    assert all(p.requires_grad for p in model.parameters())
    layers = inject_lora(model, lora_config(["query", "value", "dense"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B")}


@pytest.mark.parametrize("past_dropout", [False, True])
def test_dropout_reaches_the_frozen_stack_only_with_past_dropout(past_dropout: bool, gen: torch.Generator) -> None:
    """O-LoRA's official layer calls one dropout module for the old adapters and again for the new one, so each
    gets its own mask; plan's default drops the slot's input only. Checked against a plain-torch formula that
    draws the masks in the same order (slot first), and in eval mode against no dropout at all."""
    base = nn.Linear(HIDDEN, HIDDEN)
    layer = LoRALinear(base, RANK, ALPHA, dropout=0.5, kernel="torch")
    for _ in range(2):  # two finished adapters in the stack, then a live slot
        nn.init.normal_(layer.lora_B, generator=gen)
        layer.freeze_slot()
        layer.reset_slot(gen)
    nn.init.normal_(layer.lora_B, generator=gen)
    layer.past_dropout = past_dropout
    x = torch.randn(3, 5, HIDDEN, generator=gen)
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), ALPHA / RANK
    base_out = base(x).detach()

    torch.manual_seed(7)
    out = layer.train()(x).detach()
    torch.manual_seed(7)
    slot_input = torch.nn.functional.dropout(x, 0.5, True)
    past_input = torch.nn.functional.dropout(x, 0.5, True) if past_dropout else x
    expected = base_out + s * (slot_input @ A.T @ B.T) + past_input @ layer.past_A.T @ layer.past_B.T
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)

    plain = base_out + s * (x @ A.T @ B.T) + x @ layer.past_A.T @ layer.past_B.T
    torch.testing.assert_close(layer.eval()(x).detach(), plain, atol=ATOL, rtol=RTOL)
