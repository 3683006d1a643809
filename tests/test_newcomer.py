"""What a new user meets first: help that lists plan's classes, callback arguments from the command line,
outputs under default_root_dir, runs that name their tasks and rounds, a held-out validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from plan.cli import run_cli
from plan.errors import ConfigError


def test_fit_help_lists_plans_classes(capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli(["fit", "--model.help", "plan.module.ContinualClassifier"])
    model_help = capsys.readouterr().out
    assert "--model.backbone" in model_help and "torch.nn.Linear" not in model_help  # not every torch module
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for name in (
        "plan.module.ContinualClassifier",
        "plan.datamodules.TaskSequenceDataModule",
        "TwentyNewsgroups",
        "InfLoRA",
        "FederatedRounds",
        "--trainer.callbacks.help",
    ):
        assert name in printed


def test_a_callback_argument_is_set_from_the_command_line(tiny) -> None:
    cli = run_cli(
        [
            "--config",
            str(tiny.config()),
            "--callback+=TaskSequencer.adapters=shared",
            "--callback+=ForgettingLogger.heatmap=false",
        ],
        run=False,
    )
    sequencer, logger = cli.trainer.callbacks[:2]
    assert sequencer.adapters == "shared" and logger.heatmap is False
    with pytest.raises(
        ConfigError, match="no callback 'PLAN' in trainer.callbacks; they are \\['TaskSequencer', 'ForgettingLogger'\\]"
    ):
        run_cli(["--config", str(tiny.config()), "--callback", "[PLAN.perturbation=none]"], run=False)
    with pytest.raises(ConfigError, match="NAME.KEY=VALUE"):
        run_cli(["--config", str(tiny.config()), "--callback+=TaskSequencer.adapters"], run=False)


def test_outputs_follow_default_root_dir(tiny, tmp_path: Path, monkeypatch) -> None:
    """The shipped configs log to the relative folder 'runs': with a default_root_dir it lands under it."""
    monkeypatch.chdir(tmp_path)
    config = tiny.config(trainer__logger__init_args__save_dir="runs")
    run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path / "elsewhere"),
            "--trainer.max_epochs",
            "1",
        ]
    )
    assert (tmp_path / "elsewhere" / "runs" / "tiny" / "v" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()


def test_runs_name_their_tasks_and_a_federation_ends_with_a_summary(tiny, tiny_fed, caplog) -> None:
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        cli = run_cli(["fit", "--config", str(tiny.config()), "--trainer.max_epochs", "2"])
        fed = run_cli(["fit", "--config", str(tiny_fed.config("federated"))])
    finally:
        lightning_logger.removeHandler(caplog.handler)
    layout = cli.model.layout
    first = ", ".join(layout.class_names[c] for c in layout.task_classes[0])
    assert f"plan: task 1 of 3: classes {first}" in caplog.text and "plan: task 2 of 3" in caplog.text
    assert f"plan: round 1 of 3: clients {fed.datamodule.sampled_clients(0)}" in caplog.text
    table = caplog.text[caplog.text.index("federated run, aggregation 'fedit'") :]
    history = fed.trainer.callbacks[0].server.history
    assert [row["round"] for row in history] == [0, 1, 2]
    last = next(line.split() for line in table.splitlines() if line.split()[:1] == ["all"])  # the totals
    assert float(last[1]) == pytest.approx(history[-1]["acc"], abs=1e-4)
    assert int(last[2]) == sum(row["aggregated"] for row in history)
    assert cli.datamodule.stage_name(1) == "task 2/3" and fed.datamodule.stage_name(0) == "round 1/3"


def test_a_held_out_validation_split_feeds_the_matrix_and_test_keeps_the_test_split(tiny) -> None:
    """val_fraction=0.25 holds out a quarter of each task's 32 training examples (8): validation reads them,
    training never does, and plan test reads the test split."""
    config = tiny.config(data__init_args__val_fraction=0.25)
    cli = run_cli(["fit", "--config", str(config)])
    data = cli.datamodule
    (_, train), (_, val) = data._splits["train"], data._splits["val"]
    for task in range(3):
        assert len(val[task]) == 8 and len(train[task]) == 24 and not set(val[task]) & set(train[task])
    assert [len(loader.batch_sampler) for loader in data.task_eval_loaders(3)] == [1, 1, 1]  # 8 examples, batch 8
    test = run_cli(["test", "--config", str(config), "--ckpt_path", str(tiny.checkpoints() / "last.ckpt")])
    assert sum(len(batch) for loader in test.trainer.test_dataloaders for batch in loader.batch_sampler) == 48
    assert not torch.isnan(tiny.matrix().tril()).all()


def test_a_federation_holds_out_the_servers_validation_set_before_partitioning(tiny_fed) -> None:
    """val_fraction=0.25 of the 96 training examples (24) never reach a client; validation reads them."""
    cli = run_cli(["--config", str(tiny_fed.config(data__init_args__val_fraction=0.25))], run=False)
    data = cli.datamodule
    data.setup("fit")
    assert sum(data.client_sizes) == 72 and len(data._val) == 24 and len(data._test) == 48
    (val,), (test,) = data.val_dataloader(), data.test_dataloader()
    assert val.dataset is data._val and test.dataset is data._test
