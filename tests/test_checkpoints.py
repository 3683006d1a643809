"""Checkpoints a run can trust: atomic writes, verified reads, settings compared on resume, protected folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plan import cli
from plan.checkpoints import atomic_save, read_checkpoint, run_settings, settings_diff, settings_source
from plan.errors import ConfigError


def fit(config: Path, *extra: str) -> None:
    cli.run_cli(["fit", "--config", str(config), *extra])


def plan_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run the ``plan`` console command in this process; its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["plan", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path: Path, monkeypatch) -> None:
    """The new file is written beside the old one and renamed over it only once complete."""
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def dies_while_writing(obj, file) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a kill looks like from inside: the write never finishes

    monkeypatch.setattr(torch, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is empty \\(0 bytes\\)"),
        ("truncated", "not a readable plan checkpoint"),
        ("safetensors", "not a readable plan checkpoint"),
        (
            "foreign",
            "not a training checkpoint written by plan fit \\(it lacks \\['state_dict', 'callbacks', 'loops'\\]",
        ),
    ],
)
def test_a_bad_checkpoint_file_gets_one_clear_message(tiny, monkeypatch, capsys, content, message) -> None:
    """Empty, truncated, another format, or a torch file that is not a training checkpoint: the plan command
    prints one line naming the file, with no traceback, before any work starts."""
    config = tiny.config()
    bad = tiny.root / "bad.ckpt"
    if content is None:
        bad.write_bytes(b"")
    elif content == "truncated":
        atomic_save({"state_dict": {"w": torch.randn(1000)}, "callbacks": {}, "loops": {}}, bad)
        bad.write_bytes(bad.read_bytes()[:600])
    elif content == "safetensors":
        save_file({"w": torch.ones(2)}, str(bad))
    else:
        torch.save({"w": torch.ones(2)}, bad)
    with pytest.raises(ConfigError, match=message):
        read_checkpoint(bad)
    status, err = plan_command(monkeypatch, capsys, "fit", "--config", str(config), "--ckpt_path", str(bad))
    assert status == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("plan: error: ckpt_path:") and str(bad) in line
    assert not (tiny.checkpoints()).exists(), "nothing was trained"


def test_settings_diff_lists_every_changed_added_and_removed_setting() -> None:
    stored = run_settings(
        settings_source(
            {
                "seed_everything": 0,
                "model": {"class_path": "M", "init_args": {"lr": 0.01, "lora": {"rank": 4}}},
                "data": {"init_args": {"batch_size": 8, "num_workers": 0}},
                "trainer": {
                    "callbacks": [{"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}}]
                },
            }
        )
    )
    requested = run_settings(
        settings_source(
            {
                "seed_everything": 0,
                "model": {"class_path": "M", "init_args": {"lr": 0.02, "lora": {"rank": 4}}},
                "data": {"init_args": {"batch_size": 8, "num_workers": 4}},  # loading workers may change
                "trainer": {
                    "callbacks": [
                        {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}},
                        {"class_path": "plan.callbacks.InfLoRA", "init_args": {"a_scale": 0.5}},
                        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},  # not a method: may change
                    ]
                },
            }
        )
    )
    assert settings_diff(stored, requested) == [
        ("callback plan.callbacks.InfLoRA", "(not set)", "present"),
        ("callback plan.callbacks.InfLoRA.a_scale", "(not set)", 0.5),
        ("model.init_args.lr", 0.01, 0.02),
    ]


def test_resume_with_other_settings_is_refused_naming_each_difference(tiny) -> None:
    fit(tiny.config("run"), "--trainer.max_epochs", "1")
    checkpoint = tiny.checkpoints("run") / "last.ckpt"
    inflora = {"class_path": "plan.callbacks.InfLoRA"}
    changed = tiny.config(
        "run",
        model__init_args__lr=0.5,
        model__init_args__lora={"rank": 2, "alpha": 8, "target_modules": ["query", "value"]},
        trainer__callbacks=[*tiny.base["trainer"]["callbacks"], inflora],
    )
    with pytest.raises(ConfigError) as error:
        fit(changed, "--ckpt_path", str(checkpoint))
    message = str(error.value)
    assert "model.init_args.lr: checkpoint 0.01, requested 0.5" in message
    assert "model.init_args.lora.rank: checkpoint 4, requested 2" in message
    assert "callback plan.callbacks.InfLoRA: checkpoint '(not set)', requested 'present'" in message
    assert "--resume_settings checkpoint" in message


def test_resume_settings_checkpoint_takes_the_checkpoints_values(tiny) -> None:
    """With the switch, a resume whose file asks for another lr and rank runs with the checkpoint's and ends
    exactly like the uninterrupted run."""
    fit(tiny.config("full"))
    fit(tiny.config("part"), "--trainer.max_epochs", "1")
    changed = tiny.config("part", model__init_args__lr=0.5, data__init_args__batch_size=4)
    with pytest.warns(UserWarning, match="model.init_args.lr: checkpoint 0.01, requested 0.5"):
        fit(changed, "--ckpt_path", str(tiny.checkpoints("part") / "last.ckpt"), "--resume_settings", "checkpoint")
    full, part = tiny.last("full")["state_dict"], tiny.last("part")["state_dict"]
    for key in full:
        assert torch.equal(part[key], full[key]), key


def test_a_run_never_writes_into_another_runs_checkpoint_folder(tiny) -> None:
    config = tiny.config()
    fit(config, "--trainer.max_epochs", "1")
    with pytest.raises(ConfigError, match=r"already holds checkpoints of another run \(last.ckpt, task-epoch=0.ckpt\)"):
        fit(config)
    assert sorted(p.name for p in tiny.checkpoints().iterdir()) == ["last.ckpt", "task-epoch=0.ckpt"]
