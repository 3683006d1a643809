"""End-to-end runs of ``plan fit`` on a tiny random model: outputs, resume, distributed, precision, bad input."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plan.cli import run_cli as main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def fit(config, *extra: str) -> None:
    main(["fit", "--config", str(config), *extra])


def test_fit_fills_matrix_checkpoints_and_tensorboard(tiny, caplog):
    """One fit runs every task: one checkpoint per task, a full lower triangle, and the TensorBoard views."""
    # Lightning's loggers do not propagate to the root logger that caplog listens on: listen on them directly.
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        fit(tiny.config())
    finally:
        lightning_logger.removeHandler(caplog.handler)
    printed = caplog.text
    names = sorted(p.name for p in tiny.checkpoints().iterdir())
    assert names == ["last.ckpt", "task-epoch=0.ckpt", "task-epoch=1.ckpt", "task-epoch=2.ckpt"]
    matrix = tiny.matrix()
    lower = torch.ones(3, 3, dtype=torch.bool).tril()
    assert not torch.isnan(matrix[lower]).any() and torch.isnan(matrix[~lower]).all()
    assert "accuracy matrix R[i, j]" in printed and "forgetting" in printed

    events = EventAccumulator(str(tiny.root / "run" / "tiny" / "v"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"cl/acc/task_0", "cl/acc/task_2", "cl/avg_acc", "cl/avg_inc_acc", "cl/forgetting", "cl/bwt"} <= scalars
    assert "cl/accuracy_matrix" in events.Tags()["images"]
    curve = [e.value for e in events.Scalars("cl/acc/task_0")]
    assert curve == pytest.approx(matrix[:, 0].tolist(), abs=1e-6)
    final = events.Scalars("cl/avg_acc")[-1]
    assert final.step == 3 and final.value == pytest.approx(matrix[2].mean().item(), abs=1e-6)


def test_test_and_validate_subcommands_reproduce_the_last_row(tiny):
    """`plan test` and `plan validate` on the final checkpoint give the accuracy matrix's last row."""
    config = tiny.config()
    fit(config)
    last_row = tiny.matrix()[-1].tolist()
    for command, split in (("test", "test"), ("validate", "val")):
        cli = main([command, "--config", str(config), "--ckpt_path", str(tiny.checkpoints() / "last.ckpt")])
        measured = [cli.trainer.callback_metrics[f"{split}/acc_task_{task}"].item() for task in range(3)]
        assert measured == pytest.approx(last_row, abs=1e-6)


def test_task_incremental_bounds_class_incremental(tiny):
    """Same training, two evaluations: ranking only the task's classes is never worse than ranking all seen
    classes, and within a task the tiny model learns well above the 0.5 chance level."""
    fit(tiny.config("cil"))
    fit(tiny.config("til", data__init_args__scenario="task_incremental"))
    cil, til = tiny.matrix("cil"), tiny.matrix("til")
    lower = ~torch.isnan(cil)
    assert (til[lower] >= cil[lower]).all(), f"TIL {til}\nCIL {cil}"
    assert til.diagonal().min() > 0.5, til


def test_stacked_adapters_freeze_each_task(tiny):
    """Stacked mode leaves one frozen rank-r adapter per task in every LoRA layer and an empty slot."""
    fit(tiny.config())
    state = tiny.last()["state_dict"]
    past = [k for k in state if k.endswith("past_A")]
    assert past and all(state[k].shape[0] == 3 * 4 for k in past)
    assert all(state[k].abs().max() == 0 for k in state if k.endswith("lora_B"))
    assert not any(k.endswith("word_embeddings.weight") for k in state), "frozen backbone weights are not checkpointed"


def test_shared_adapter_keeps_training(tiny):
    """Sequential LoRA: no frozen stack, the one adapter carries every task's update."""
    config = tiny.config(
        trainer__callbacks=[
            {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "shared"}},
            {"class_path": "plan.callbacks.ForgettingLogger"},
        ]
    )
    fit(config)
    state = tiny.last()["state_dict"]
    assert all(state[k].numel() == 0 for k in state if k.endswith("past_A"))
    assert all(state[k].abs().max() > 0 for k in state if k.endswith("lora_B"))


def test_joint_upper_bound_is_one_stage(tiny):
    """Joint training is one stage on the union of the tasks, evaluated on every task."""
    fit(tiny.config(data__init_args__joint=True, data__init_args__passes_per_task=4))
    matrix = tiny.matrix()
    assert torch.isnan(matrix[:2]).all() and not torch.isnan(matrix[2]).any()
    assert matrix[2].mean() > 1 / 6


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_matches_uninterrupted_run(tiny, stop_after):
    """A run stopped after a task and resumed from its checkpoint ends exactly like the uninterrupted run."""
    fit(tiny.config("full"))
    fit(tiny.config("part"), "--trainer.max_epochs", str(stop_after))
    checkpoint = tiny.checkpoints("part") / f"task-epoch={stop_after - 1}.ckpt"
    fit(tiny.config("part"), "--ckpt_path", str(checkpoint))
    torch.testing.assert_close(tiny.matrix("part"), tiny.matrix("full"), rtol=0, atol=0, equal_nan=True)
    full, resumed = tiny.last("full")["state_dict"], tiny.last("part")["state_dict"]
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


def test_resume_refuses_checkpoint_of_another_task_sequence(tiny):
    fit(tiny.config("a"), "--trainer.max_epochs", "1")
    checkpoint = tiny.checkpoints("a") / "last.ckpt"
    with pytest.raises(ValueError, match="data.init_args.class_order_seed: checkpoint 1993, requested 7"):
        fit(tiny.config("b", data__init_args__class_order_seed=7), "--ckpt_path", str(checkpoint))


def test_bf16_mixed_runs_and_learns(tiny):
    fit(tiny.config(trainer__precision="bf16-mixed", data__init_args__scenario="task_incremental"))
    assert tiny.matrix().diagonal().min() > 0.5


def test_ddp_two_processes_match_single_process(tiny):
    """With every dropout at 0, DDP on 2 CPU processes (gloo) sees the same global batches as one process and
    ends with the same adapters and head up to float32 rounding of the gradient all-reduce (measured 1.1e-6
    against values up to 0.24), hence the same accuracy matrix up to a rare flipped prediction."""
    fit(tiny.config("single"))
    config = tiny.config("ddp", trainer__strategy="ddp", trainer__devices=2)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plan = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    result = subprocess.run(
        [*plan.split(), "fit", "--config", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = tiny.matrix("single"), tiny.matrix("ddp")
    lower = ~torch.isnan(single)
    assert torch.equal(lower, ~torch.isnan(ddp))
    assert (single[lower] - ddp[lower]).abs().max() <= 1 / 16 + 1e-9, f"single {single}\nddp {ddp}"
    one, two = tiny.last("single")["state_dict"], tiny.last("ddp")["state_dict"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_print_config_shows_the_scenario(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "plan.datamodules.TwentyNewsgroups" in printed and "classes_per_task: 4" in printed


@pytest.mark.parametrize("config", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err


def test_unknown_config_key_names_the_key(tiny, capsys):
    config = tiny.config(model__init_args__rnak=4)
    with pytest.raises(SystemExit) as exit_info:
        fit(config)
    assert exit_info.value.code != 0
    assert "rnak" in capsys.readouterr().err


def test_missing_model_path_is_named(tiny):
    config = tiny.config(model__init_args={"backbone": "./no/such/model"})
    with pytest.raises(ValueError, match="model path './no/such/model' does not exist"):
        fit(config)


def test_eval_on_all_tasks_measures_forward_transfer(tiny):
    """Validating on every task fills the whole matrix; the untrained accuracy is measured once, and the
    logged forward transfer is mean_i (R[i-1, i] - b[i])."""
    source = {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 4, "num_domains": 3}}
    fit(
        tiny.config(
            data__init_args={"source": source, "scenario": "domain_incremental", "eval_tasks": "all", "batch_size": 8}
        )
    )
    state = tiny.last()["callbacks"]["ForgettingLogger"]
    matrix, baseline = state["matrix"], state["baseline"]
    assert not torch.isnan(matrix).any() and baseline.shape == (3,)
    expected = sum(matrix[i - 1, i] - baseline[i] for i in (1, 2)).item() / 2
    events = EventAccumulator(str(tiny.root / "run" / "tiny" / "v")).Reload()
    assert events.Scalars("cl/fwt")[-1].value == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["InfLoRA", "GradientProjection", "PLAN"])
def test_subspace_methods_run_under_ddp_and_agree_with_one_process(tiny, method):
    """InfLoRA and PLAN freeze the down-projection at every task start, after DDP registered it as trainable;
    the sequencer makes DDP look for parameters without a gradient, so 2 processes train. The input statistics
    leave padding out, so they do not depend on how a rank pads its share, and PLAN's candidate directions are
    an ordered Gram-Schmidt basis, which rounding cannot rotate: every method ends with one process's adapters
    (dropout off) up to float32 rounding."""
    init_args = {"max_examples": 16, "threshold_start": 0.8, "threshold_end": 0.8}
    callbacks = [
        {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}},
        {"class_path": "plan.callbacks.ForgettingLogger"},
        {"class_path": f"plan.callbacks.{method}", "init_args": init_args},
    ]
    fit(tiny.config("single", trainer__callbacks=callbacks))
    config = tiny.config("ddp", trainer__strategy="ddp", trainer__devices=2, trainer__callbacks=callbacks)
    plan = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [*plan.split(), "fit", "--config", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = tiny.last("single")["state_dict"], tiny.last("ddp")["state_dict"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
