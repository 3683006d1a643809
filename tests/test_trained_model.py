"""Using what a run trained: load_from_checkpoint, plan predict, plan test on a mid-sequence checkpoint, and plan
export to PEFT (checked against PEFT's own forward), plus the model settings refused before training."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BERT
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from plan.cli import main, run_cli
from plan.errors import ConfigError
from plan.module import ContinualClassifier


def fit(config: Path, *extra: str):
    return run_cli(["fit", "--config", str(config), *extra])


@pytest.fixture
def saved_backbone(tmp_path: Path) -> Path:
    """The tiny BERT with fixed random weights, saved as a pretrained folder (what export needs)."""
    fields = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    AutoModel.from_config(AutoConfig.for_model("bert", **fields)).save_pretrained(folder)
    return folder


def pretrained(tiny, backbone: Path) -> Path:
    """The tiny run on a saved backbone (checkpoints leave frozen weights out, so a reload needs a real one)."""
    model = {
        "backbone": str(backbone),
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "lr": 0.01,
    }
    return tiny.config(model__init_args=model, data__init_args__tokenizer="embedded:all-MiniLM-L6-v2")


def test_load_from_checkpoint_needs_no_datamodule_and_predicts_like_the_run(tiny, saved_backbone) -> None:
    cli = fit(pretrained(tiny, saved_backbone))
    loaded = ContinualClassifier.load_from_checkpoint(tiny.checkpoints() / "last.ckpt")
    assert loaded.layout.class_names == cli.model.layout.class_names
    batch = next(iter(cli.datamodule.task_eval_loaders(1)[0]))
    loaded.eval(), cli.model.eval()
    torch.testing.assert_close(loaded(batch), cli.model(batch), rtol=0, atol=0)
    # a fresh process that imports only the module loads it too (torch.load with weights_only=True)
    code = f"from plan.module import ContinualClassifier; ContinualClassifier.load_from_checkpoint({str(tiny.checkpoints() / 'last.ckpt')!r})"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


def test_test_on_a_mid_sequence_checkpoint_evaluates_the_tasks_it_trained(tiny) -> None:
    """After 2 of 3 tasks, plan test reports tasks 0 and 1, with the numbers of the matrix's row 1."""
    config = tiny.config()
    fit(config, "--trainer.max_epochs", "2")
    row = tiny.matrix()[1, :2].tolist()
    cli = run_cli(["test", "--config", str(config), "--ckpt_path", str(tiny.checkpoints() / "task-epoch=1.ckpt")])
    metrics = cli.trainer.callback_metrics
    assert "test/acc_task_2" not in metrics
    assert [metrics[f"test/acc_task_{t}"].item() for t in range(2)] == pytest.approx(row, abs=1e-6)


def test_predict_writes_one_row_per_example_and_agrees_with_the_model(tiny) -> None:
    config = tiny.config()
    cli = fit(config)
    run_cli(["predict", "--config", str(config), "--ckpt_path", str(tiny.checkpoints() / "last.ckpt")])
    with open(tiny.checkpoints().parent / "predictions-test.csv") as file:
        rows = list(csv.DictReader(file))
    dataset, _ = cli.datamodule._splits["test"]
    assert [int(r["index"]) for r in rows] == list(range(len(dataset)))
    names = cli.model.layout.class_names
    assert [r["label"] for r in rows] == [names[int(label)] for label in dataset.labels]
    # the predicted classes are the model's own argmax; predictions right as often as the test accuracy says
    correct = sum(r["label"] == r["predicted"] for r in rows) / len(rows)
    final_row = tiny.matrix()[-1]
    assert correct == pytest.approx(final_row.mean().item(), abs=1e-6)  # equal-sized tasks: mean = overall
    assert all(0 < float(r["score"]) <= 1 for r in rows)


def test_predict_reads_a_text_file(tiny) -> None:
    config = tiny.config()
    fit(config)
    texts = tiny.root / "new.txt"
    texts.write_text("apple river stone\n\npiano tiger lemon\n")
    out = tiny.root / "out.csv"
    run_cli(
        [
            "predict",
            "--config",
            str(config),
            "--ckpt_path",
            str(tiny.checkpoints() / "last.ckpt"),
            "--data.init_args.predict_file",
            str(texts),
            "--predictions",
            str(out),
        ]
    )
    with open(out) as file:
        rows = list(csv.DictReader(file))
    assert [(r["index"], r["label"]) for r in rows] == [("0", ""), ("1", "")]


def test_export_loads_in_peft_and_reproduces_the_classifier(tiny, saved_backbone, monkeypatch, capsys) -> None:
    """plan export writes a PEFT adapter that PeftModel.from_pretrained loads on the named base model; PEFT's
    features through the exported head give the plan module's logits."""
    from peft import PeftModel

    cli = fit(pretrained(tiny, saved_backbone))
    out = tiny.root / "export"
    monkeypatch.setattr(
        sys, "argv", ["plan", "export", "--ckpt_path", str(tiny.checkpoints() / "last.ckpt"), "--output", str(out)]
    )
    main()
    assert f"to {out}" in capsys.readouterr().err
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(saved_backbone)
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(adapter_config["base_model_name_or_path"]), out
    ).eval()
    head = load_file(out / "head.safetensors")
    labels = json.loads((out / "labels.json").read_text())
    assert labels["class_names"] == cli.model.layout.class_names and labels["tasks_trained"] == 3
    batch = next(iter(cli.datamodule.task_eval_loaders(1)[0]))
    mask = batch["attention_mask"].unsqueeze(-1).float()
    hidden = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = F.linear((hidden * mask).sum(1) / mask.sum(1), head["weight"], head["bias"])
    cli.model.eval()
    torch.testing.assert_close(logits, cli.model(batch), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_random_backbone_that_checkpoints_do_not_hold(tiny) -> None:
    fit(tiny.config())
    from plan.export import export_checkpoint

    with pytest.raises(ConfigError, match="built from backbone_config with random weights"):
        export_checkpoint(tiny.checkpoints() / "last.ckpt", tiny.root / "export")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model__init_args__lr": -0.1}, "model.lr must be > 0"),
        ({"model__init_args__head_lr": 0}, "model.head_lr must be > 0"),
        ({"model__init_args__weight_decay": -1}, "model.weight_decay must be >= 0"),
        ({"data__init_args__classes_per_task": 1}, "tasks \\['task_0', .* have one class, so their loss is exactly 0"),
        ({"data__init_args__batch_size": 0}, "batch_size must be >= 1"),
        ({"model__init_args__lora": {"rank": 4, "alpha": 0}}, "lora.alpha must be > 0"),
    ],
)
def test_model_and_data_mistakes_print_one_line_before_training(tiny, monkeypatch, capsys, overrides, message) -> None:
    """Through the plan command: exit status 2, one line naming the key and the value, no traceback, no run."""
    monkeypatch.setattr(sys, "argv", ["plan", "fit", "--config", str(tiny.config(**overrides))])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    (line,) = [text for text in err.strip().splitlines() if text.startswith("plan: error:")]
    import re

    assert re.search(message, line), line
    assert not tiny.checkpoints().exists()


def test_the_tokenizer_follows_the_backbone(tiny, saved_backbone) -> None:
    """With no data tokenizer set, the data is encoded with the backbone's own (here the folder's tokenizer
    files); a backbone built from a config falls back to the embedded MiniLM's."""
    from plan.models import load_tokenizer

    load_tokenizer().save_pretrained(saved_backbone)
    model = {"backbone": str(saved_backbone), "lora": {"rank": 4, "alpha": 8}}
    cli = fit(tiny.config("own", model__init_args=model), "--trainer.max_epochs", "1")
    assert cli.datamodule.tokenizer_name == str(saved_backbone)
    cli = fit(tiny.config("random"), "--trainer.max_epochs", "1")
    assert cli.datamodule.tokenizer_name == "embedded:all-MiniLM-L6-v2"
