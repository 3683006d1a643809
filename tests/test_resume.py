"""Kill-and-resume in real processes: a ``plan fit`` killed with SIGKILL at a chosen step and resumed from its
latest checkpoint ends bit-identical to the uninterrupted run, with every dropout on (LoRA's and the backbone's),
for continual runs with each method and for federated runs, whether the kill falls mid-task or mid-round."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_FEDERATED_RUN, TinyRun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# the SIGKILL-at-a-step callback that benchmarks/resume.py writes beside its runs, shared with these tests
_spec = importlib.util.spec_from_file_location(
    "resume_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "resume.py"
)
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)
KILLER = _benchmark.KILLER

DROPOUT = {
    "model__init_args__backbone_config": {**TINY_BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "model__init_args__lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]},
}


def callbacks(adapters: str, *methods: dict) -> list[dict]:
    sequencer = {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": adapters}}
    return [sequencer, {"class_path": "plan.callbacks.ForgettingLogger"}, *methods]


METHODS = {
    "sequential": callbacks("shared"),
    "olora+coto": callbacks(
        "stacked",
        {"class_path": "plan.callbacks.OLoRA", "init_args": {"lambda_orth": 0.1}},
        {"class_path": "plan.callbacks.ProgressiveActivation", "init_args": {"start": 0.5}},
    ),
    "inflora": callbacks("stacked", {"class_path": "plan.callbacks.InfLoRA", "init_args": {"max_examples": 16}}),
    "gpm": callbacks("stacked", {"class_path": "plan.callbacks.GradientProjection"}),
    "plan": callbacks(
        "stacked",
        {
            "class_path": "plan.callbacks.PLAN",
            "init_args": {"perturbation": "future", "max_examples": 16, "threshold_start": 0.8, "threshold_end": 0.8},
        },
    ),
    "plan+conflict": callbacks(  # the loss term reads the task's moments, which a checkpoint must carry
        "stacked",
        {
            "class_path": "plan.callbacks.PLAN",
            "init_args": {"perturbation": "conflict", "max_examples": 16, "threshold_start": 0.8, "threshold_end": 0.8},
        },
    ),
}


def plan_fit(config: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    """``plan fit`` in a fresh process (the folder ``cwd`` on its path, for the killer callback)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    command = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    return subprocess.run(
        [*command.split(), "fit", "--config", str(config), *extra], capture_output=True, text=True, env=env, timeout=600
    )


def kill_and_resume(run: TinyRun, kill_at: int, every: int, **overrides) -> tuple[dict, dict, Path]:
    """The uninterrupted run's last checkpoint, the killed-and-resumed run's, and the resumed run's log folder."""
    (run.root / "killer.py").write_text(KILLER)
    step_checkpoint = {"every_n_train_steps": every}
    full = run.config("full", step_checkpoint=step_checkpoint, **overrides)
    assert plan_fit(full, cwd=run.root).returncode == 0
    killer = {"class_path": "killer.KillAtStep", "init_args": {"step": kill_at}}
    trainer_callbacks = [*overrides.get("trainer__callbacks", run.base["trainer"]["callbacks"]), killer]
    killed = run.config(
        "part", step_checkpoint=step_checkpoint, **{**overrides, "trainer__callbacks": trainer_callbacks}
    )
    result = plan_fit(killed, cwd=run.root)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    (folder,) = (run.root / "part" / "tiny").iterdir()
    resumed = plan_fit(
        run.config("part", step_checkpoint=step_checkpoint, **overrides),
        "--ckpt_path",
        str(folder / "checkpoints" / "last.ckpt"),
        cwd=run.root,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    load = lambda name: torch.load(
        next((run.root / name / "tiny").iterdir()) / "checkpoints" / "last.ckpt", weights_only=False
    )
    return load("full"), load("part"), folder


def assert_same(got: object, want: object, where: str) -> None:
    """Equal to the last bit (NaN equal to NaN), recursively through dicts, lists and tuples."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, where
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan()), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_identical(resumed: dict, full: dict, keys: tuple[str, ...]) -> None:
    """Adapters, head, optimizer state and the given callbacks' states are bit-identical."""
    assert_same(resumed["state_dict"], full["state_dict"], "state_dict")
    assert_same(resumed["optimizer_states"], full["optimizer_states"], "optimizer_states")
    for key in keys:
        assert_same(resumed["callbacks"][key], full["callbacks"][key], key)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_continual_run_killed_mid_task_resumes_bit_identical(tmp_path: Path, method: str) -> None:
    """3 tasks of 8 steps; checkpoints every 3 steps; killed at step 11 (task 1, 3 steps in), so the resume starts
    from the step-9 checkpoint, 1 step into task 1, and must replay steps 9..10 exactly."""
    run = TinyRun(tmp_path)
    full, resumed, folder = kill_and_resume(
        run,
        kill_at=11,
        every=3,
        trainer__callbacks=METHODS[method],
        trainer__logger__init_args__version=None,
        **DROPOUT,
    )
    method_states = [
        key
        for key in full["callbacks"]
        if key.split("{")[0] not in ("TaskSequencer", "ModelCheckpoint", "MidTaskCheckpoint", "RunSettings")
    ]
    assert_identical(resumed, full, tuple(method_states))
    # the resumed run logged into the run it continued: one version folder with every task's curve
    assert [p.name for p in folder.parent.iterdir()] == ["version_0"]
    events = EventAccumulator(str(folder)).Reload()
    assert [e.step for e in events.Scalars("cl/avg_acc")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fedit", "flora"])
def test_federated_run_killed_mid_round_resumes_bit_identical(tmp_path: Path, rule: str) -> None:
    """3 rounds of 4 sampled clients, 8 steps a round; checkpoints every 5 steps; killed at step 13, so the resume
    starts from the step-10 checkpoint, taken inside a client's local training in round 1."""
    run = TinyRun(tmp_path, TINY_FEDERATED_RUN)
    fed = [{"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": rule}}]
    full, resumed, _ = kill_and_resume(run, kill_at=13, every=5, trainer__callbacks=fed, **DROPOUT)
    assert_identical(resumed, full, ("FederatedRounds",))
