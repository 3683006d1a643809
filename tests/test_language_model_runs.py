"""The causal language model end to end through ``plan fit``: every continual method and every aggregation rule
runs on a tiny random Llama trained on instructions, a run killed mid-task resumes bit-identical, bf16 runs on
the CPU, gradient checkpointing changes no number, the frozen base is shared (never copied per task or client),
TensorBoard shows generated answers, and ``plan export`` writes a PEFT adapter that reproduces the logits."""

from __future__ import annotations

import gc
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA_LM, TINY_LM_FEDERATED_RUN, TINY_LM_RUN, TinyRun, plan_in_processes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import assert_identical, kill_and_resume

from plan.callbacks import TaskCallback
from plan.cli import main, run_cli
from plan.instructions import IGNORE
from plan.language_model import ContinualLM
from plan.lora import LoRAConfig


def fit(config: Path, *extra: str):
    return run_cli(["fit", "--config", str(config), *extra])


def callbacks(adapters: str, *methods: dict) -> list[dict]:
    sequencer = {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": adapters}}
    return [sequencer, {"class_path": "plan.callbacks.ForgettingLogger", "init_args": {"heatmap": False}}, *methods]


SMALL = {"max_examples": 4, "threshold_start": 0.8, "threshold_end": 0.9}

METHODS = {
    "sequential": callbacks("shared"),
    "stacked": callbacks("stacked"),
    "olora": callbacks("stacked", {"class_path": "plan.callbacks.OLoRA", "init_args": {"lambda_l2": 0.01}}),
    "inflora": callbacks("stacked", {"class_path": "plan.callbacks.InfLoRA", "init_args": SMALL}),
    "gpm": callbacks("stacked", {"class_path": "plan.callbacks.GradientProjection", "init_args": SMALL}),
    "plan": callbacks("stacked", {"class_path": "plan.callbacks.PLAN", "init_args": SMALL}),
    "coto": callbacks("stacked", {"class_path": "plan.callbacks.ProgressiveActivation", "init_args": {"start": 0.5}}),
    "joint": callbacks("shared"),
}

RULES = ["fedit", "ffa_lora", "lora_fair", "flexlora", "flora"]


def frozen_base(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's frozen weights (everything but the LoRA slots and stacks), by name."""
    return {
        name: p
        for name, p in module.backbone.named_parameters()
        if not name.endswith(("lora_A", "lora_B")) and not p.requires_grad
    }


# -- every method and every rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_continual_method_runs_on_the_language_model(tiny_lm: TinyRun, method: str) -> None:
    """2 tasks through the CLI, every task evaluated after every task (and before the first, for forward
    transfer): the whole accuracy matrix is finite scores in [0, 1], and the adapters trained."""
    overrides = {"trainer__callbacks": METHODS[method], "data__init_args__eval_tasks": "all"}
    if method == "joint":
        overrides["data__init_args__joint"] = True
    cli = fit(tiny_lm.config(**overrides))
    matrix = tiny_lm.matrix()
    measured = matrix[-1:] if method == "joint" else matrix  # joint training fills the row after every task
    assert torch.isfinite(measured).all() and ((measured >= 0) & (measured <= 1)).all(), matrix
    layers = cli.model.lora_layers.values()
    if METHODS[method][0]["init_args"]["adapters"] == "stacked":
        assert all(layer.past_rank == 2 * layer.rank for layer in layers)
        assert any(layer.past_B.any() for layer in layers), "the stacked adapters trained"
    else:
        assert any(layer.lora_B.any() for layer in layers), "the shared adapter trained"
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())


@pytest.mark.parametrize("rule", RULES)
def test_every_aggregation_rule_runs_on_the_language_model(tiny_lm_fed: TinyRun, rule: str) -> None:
    """2 rounds of 2 of 3 clients: every client's update is aggregated, the score is finite, and the global
    adapter moved (for FLoRA: the merged stack)."""
    aggregation = (
        {"class_path": "plan.aggregation.LoRAFAIR", "init_args": {"steps": 20}} if rule == "lora_fair" else rule
    )
    rounds = [{"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": aggregation}}]
    cli = fit(tiny_lm_fed.config(trainer__callbacks=rounds))
    history = cli.trainer.callbacks[0].server.history
    assert [row["round"] for row in history] == [0, 1]
    assert all(row["aggregated"] == 2 and row["excluded"] == 0 for row in history)
    assert all(0 <= row["acc"] <= 1 and math.isfinite(row["cosine_to_ideal"]) for row in history)
    layers = cli.model.lora_layers.values()
    moved = (
        any(layer.past_B.any() for layer in layers) if rule == "flora" else any(layer.lora_B.any() for layer in layers)
    )
    assert moved


# -- resume, precision, gradient checkpointing ----------------------------------------------------------------

MODEL_DROPOUT = {
    "model__init_args__backbone_config": {**TINY_LLAMA_LM, "attention_dropout": 0.1},
    "model__init_args__lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
}
DROPOUT = {
    **MODEL_DROPOUT,
    "data__init_args__source": {
        "class_path": "plan.datamodules.SyntheticSource",
        "init_args": {"num_classes": 4, "train_per_class": 12, "test_per_class": 2},
    },
    "data__init_args__passes_per_task": 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sequential", "inflora", "plan"])
def test_a_language_model_run_killed_mid_task_resumes_bit_identical(tmp_path: Path, method: str) -> None:
    """2 tasks of 6 steps (24 examples, batch 8, 2 passes); checkpoints every 4 steps; killed at step 9 (task 1,
    3 steps in), so the resume starts from the step-8 checkpoint, 2 steps into task 1, and must replay step 8."""
    run = TinyRun(tmp_path, TINY_LM_RUN)
    full, resumed, _ = kill_and_resume(
        run, kill_at=9, every=4, trainer__callbacks=METHODS[method], trainer__logger__init_args__version=None, **DROPOUT
    )
    methods = [key for key in full["callbacks"] if key.split("{")[0] in ("ForgettingLogger", "InfLoRA", "PLAN")]
    assert_identical(resumed, full, tuple(methods))
    assert torch.isfinite(full["callbacks"]["ForgettingLogger"]["matrix"].tril()).all()


@pytest.mark.slow
def test_a_federated_language_model_run_killed_mid_round_resumes_bit_identical(tmp_path: Path) -> None:
    """2 FedIT rounds of 2 clients, 2 local steps each; checkpoints every 5 steps; killed at step 6, so the resume
    starts from the step-5 checkpoint, taken after the first local step of round 1's first client."""
    run = TinyRun(tmp_path, TINY_LM_FEDERATED_RUN)
    full, resumed, _ = kill_and_resume(
        run, kill_at=6, every=5, trainer__logger__init_args__version=None, **MODEL_DROPOUT
    )
    assert full["global_step"] == 8
    assert_identical(resumed, full, ("FederatedRounds",))


def test_bf16_mixed_precision_runs_on_the_cpu(tiny_lm: TinyRun) -> None:
    cli = fit(tiny_lm.config(trainer__precision="bf16-mixed"))
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(tiny_lm.matrix().tril()).all()
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())


def instruction_batch(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two right-padded sequences whose first tokens are the prompt (labels ``IGNORE``)."""
    input_ids = torch.randint(vocab, (2, 12), generator=generator)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :6] = IGNORE
    labels[attention_mask == 0] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients() -> None:
    """The same weights and batch with and without checkpointing: equal loss and LoRA gradients, and the
    checkpointed model really recomputes (its LoRA layers run a second time in the backward pass)."""
    results = {}
    state = None
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ContinualLM(
            backbone_config=TINY_LLAMA_LM, lora=LoRAConfig(rank=4, alpha=8), gradient_checkpointing=checkpointing
        )
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        for layer in model.lora_layers.values():  # B = 0 would leave A without a gradient
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        calls: list[int] = []
        first = next(iter(model.lora_layers.values()))
        first.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        loss = model.task_loss(instruction_batch(TINY_LLAMA_LM["vocab_size"], torch.Generator().manual_seed(1)))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.detach(), grads, len(calls))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results[False], results[True]
    assert (calls, calls_ckpt) == (1, 2)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and all(name.endswith(("lora_A", "lora_B")) for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if name.endswith("lora_A"))


# -- the frozen base is shared ---------------------------------------------------------------------------------


class BaseWatch(TaskCallback):
    """At every task start and end and every training step (a federated run's client switches), the frozen
    weights' storage addresses, to compare with those at the start of training."""

    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    def record(self, pl_module) -> None:
        self.seen.append({name: p.data_ptr() for name, p in frozen_base(pl_module).items()})

    def on_train_start(self, trainer, pl_module) -> None:
        self.record(pl_module)

    def on_task_start(self, trainer, pl_module, task) -> None:
        self.record(pl_module)

    def on_task_end(self, trainer, pl_module, task) -> None:
        self.record(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.record(pl_module)


def live_copies(base: dict[str, torch.Tensor]) -> dict[str, int]:
    """For each base weight matrix, the live tensors (anywhere in the process) that hold equal values in storage
    of their own: copies of it. (Norm weights, all ones at init, are left out: any tensor of ones would match.)"""
    base = {name: weight for name, weight in base.items() if weight.dim() >= 2}
    copies = dict.fromkeys(base, 0)
    by_shape: dict[tuple, list[str]] = {}
    for name, weight in base.items():
        by_shape.setdefault((tuple(weight.shape), weight.dtype), []).append(name)
    own = {w.untyped_storage().data_ptr() for w in base.values()}
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some objects (deprecated torch aliases) warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta]
    for obj in tensors:
        names = by_shape.get((tuple(obj.shape), obj.dtype), [])
        if not names or obj.untyped_storage().data_ptr() in own:
            continue
        for name in names:
            if torch.equal(obj.detach(), base[name]):
                copies[name] += 1
    return copies


def sharing(module: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict[str, int]:
    """For each base weight, how many of the module's parameters and buffers use its storage."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    storages = [t.untyped_storage().data_ptr() for _, t in named]
    return {name: storages.count(w.untyped_storage().data_ptr()) for name, w in base.items()}


@pytest.mark.parametrize("scenario", ["continual", "federated"])
def test_the_frozen_base_is_never_copied_per_task_or_client(tiny_lm: TinyRun, tmp_path: Path, scenario: str) -> None:
    """Through 2 tasks of stacked InfLoRA (statistics passes, stacks growing) or 2 FLoRA rounds of 2 clients
    (client switches, merges): every frozen weight keeps its storage, the module holds it once, and no other
    live tensor in the process holds a copy of it."""
    watch = {"class_path": "test_language_model_runs.BaseWatch"}
    if scenario == "continual":
        config = tiny_lm.config(trainer__callbacks=[*METHODS["inflora"], watch])
    else:
        rounds = {"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": "flora"}}
        config = TinyRun(tmp_path, TINY_LM_FEDERATED_RUN).config("fed", trainer__callbacks=[rounds, watch])
    cli = fit(config)
    (spy,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, BaseWatch)]
    assert len(spy.seen) > 5 and all(seen == spy.seen[0] for seen in spy.seen)
    base = frozen_base(cli.model)
    assert len(base) == len(spy.seen[0]) > 2 * len(cli.model.lora_layers)
    assert set(sharing(cli.model, base).values()) == {1}
    assert set(live_copies(base).values()) == {0}, {k: v for k, v in live_copies(base).items() if v}


# -- what a run shows and exports -----------------------------------------------------------------------------


def test_tensorboard_text_tab_shows_prompts_generated_answers_and_references(tiny_lm: TinyRun) -> None:
    cli = fit(tiny_lm.config(model__init_args__text_samples=2))
    events = EventAccumulator(str(tiny_lm.root / "run" / "tiny" / "v"), size_guidance={"tensors": 0}).Reload()
    tags = [tag for tag in events.Tags()["tensors"] if tag.startswith("val_samples/")]
    assert sorted(tags) == ["val_samples/task_0/text_summary", "val_samples/task_1/text_summary"]
    after = {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)} for tag in tags}
    assert sorted(after["val_samples/task_0/text_summary"]) == [1, 2]  # after each task, task 0's answers
    assert sorted(after["val_samples/task_1/text_summary"]) == [2]
    layout = cli.model.layout
    source = cli.datamodule.source
    for task, tag in enumerate(sorted(tags)):
        table = after[tag][2]
        header, _, *rows = table.splitlines()
        assert header == "| prompt (end) | generated | reference |" and len(rows) == 2
        names = {source.label_text(layout.class_names[c]) for c in layout.task_classes[task]}
        for row in rows:
            prompt, _generated, reference = (cell.strip() for cell in row.strip("|").split(" | "))
            assert reference in names and "Answer:" in prompt


TINY_GPT2_LM = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512, "vocab_size": 49152}


@pytest.fixture(params=["llama", "gpt2"])
def saved_llm(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A tiny Llama (or GPT-2, whose projections are ``Conv1D``) with fixed random weights and the embedded
    SmolLM2 tokenizer, saved as a pretrained folder (export needs a backbone a checkpoint can be reloaded on)."""
    from plan.models import EMBEDDED_SMOLLM, load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{request.param}"
    load_causal_lm(config=TINY_LLAMA_LM if request.param == "llama" else TINY_GPT2_LM).save_pretrained(folder)
    load_tokenizer(EMBEDDED_SMOLLM).save_pretrained(folder)
    return folder


def test_export_of_a_language_model_reloads_in_peft_and_reproduces_its_logits(
    tiny_lm: TinyRun, saved_llm: Path, monkeypatch, capsys
) -> None:
    """plan export on a stacked 2-task LM run: a PEFT causal-LM adapter (stack and slot) that
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), D)`` loads with the plan module's
    logits, and a JSON of the tasks and their metrics in place of a head and labels."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = {"backbone": str(saved_llm), "lora": {"rank": 4, "alpha": 8}, "lr": 0.01}
    cli = fit(tiny_lm.config(model__init_args=model))
    assert cli.datamodule.tokenizer_name == str(saved_llm)
    out = tiny_lm.root / "export"
    ckpt = tiny_lm.checkpoints() / "last.ckpt"
    monkeypatch.setattr(sys, "argv", ["plan", "export", "--ckpt_path", str(ckpt), "--output", str(out)])
    main()
    assert f"to {out}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tasks.json"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(saved_llm)
    assert adapter_config["task_type"] == "CAUSAL_LM"
    tasks = json.loads((out / "tasks.json").read_text())
    layout = cli.model.layout
    assert tasks["task_names"] == layout.task_names and tasks["tasks_trained"] == 2
    assert tasks["metrics"] == ["exact_match", "exact_match"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_llm), out).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    loaded = ContinualLM.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert all(layer.past_rank == 8 for layer in loaded.lora_layers.values())
    batch = next(iter(cli.datamodule.task_eval_loaders(2)[1]))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = loaded(batch)
        torch.testing.assert_close(want, cli.model.eval()(batch), rtol=0, atol=0)
        got = peft_model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(saved_llm)(**inputs).logits, atol=1e-4)


def test_export_refuses_a_random_language_model_and_a_foreign_class(tiny_lm: TinyRun) -> None:
    from plan.errors import ConfigError
    from plan.export import export_checkpoint, model_class

    fit(tiny_lm.config(), "--trainer.max_epochs", "1")
    with pytest.raises(ConfigError, match="built from backbone_config with random weights"):
        export_checkpoint(tiny_lm.checkpoints() / "last.ckpt", tiny_lm.root / "export")
    assert model_class({"plan_model": "plan.language_model.ContinualLM"}, "c") is ContinualLM
    assert model_class({}, "c").__name__ == "ContinualClassifier"  # checkpoints written before plan_model
    with pytest.raises(ConfigError, match="'pathlib.Path' is not a plan model"):
        model_class({"plan_model": "pathlib.Path"}, "c")
    with pytest.raises(ConfigError, match="'plan.nothing.Model' cannot be imported"):
        model_class({"plan_model": "plan.nothing.Model"}, "c")


@pytest.mark.slow
def test_federated_instruction_tuning_on_two_ddp_processes_ends_as_one_process(tiny_lm_fed):
    """FedIT's setting over DDP: 2 CPU processes (gloo) train different clients of the language model, gather
    the uploads at each round end, and end with the single process's global adapters and client store."""
    fit(tiny_lm_fed.config("single"))
    result = plan_in_processes(
        "fit", "--config", str(tiny_lm_fed.config("ddp", trainer__strategy="ddp", trainer__devices=2))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = tiny_lm_fed.last("single"), tiny_lm_fed.last("ddp")
    assert single["state_dict"].keys() == ddp["state_dict"].keys()
    for key, value in single["state_dict"].items():  # float32 sums in another order per process: 1.2e-6 seen
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    assert sorted(ddp["callbacks"]["FederatedRounds"]["clients"]) == sorted(
        single["callbacks"]["FederatedRounds"]["clients"]
    )
