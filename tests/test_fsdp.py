"""Sharded training (FSDP2, ``trainer.strategy: fsdp2``) on CPU processes (gloo): the same run as one process, an
adapter-only checkpoint that resumes, and the strategies and backbones that cannot be sharded."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_in_processes
from torch import nn

from plan.cli import run_cli
from plan.datamodules.continual import eval_batches
from plan.errors import ConfigError
from plan.sharding import transformer_blocks

FSDP = {"trainer__strategy": "fsdp2", "trainer__devices": 2}
# Two processes see the same global batches as one and average the same gradients in another order: float32
# rounding, as under DDP (tests/test_cli.py). Measured: at most 2.1e-6 (InfLoRA; PLAN 4e-7, the language model
# 5e-8, federated 0) on values up to 0.6; the accuracy matrices and round accuracies are equal.
ATOL = 1e-5


def fit(config, *extra: str) -> None:
    run_cli(["fit", "--config", str(config), *extra])


def fit_in_processes(config, *extra: str) -> str:
    """``plan fit`` on the processes the config asks for; what they printed."""
    result = plan_in_processes("fit", "--config", str(config), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_same_training(single: dict, sharded: dict) -> None:
    """The same adapter-only checkpoint: the same keys (no backbone weight, sharded or not) and values."""
    assert sharded["state_dict"].keys() == single["state_dict"].keys()
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][key], value, rtol=0, atol=ATOL, msg=key)


def subspace_callbacks(method: str, **options) -> list[dict]:
    return [
        {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}},
        {"class_path": "plan.callbacks.ForgettingLogger"},
        {
            "class_path": f"plan.callbacks.{method}",
            "init_args": {"max_examples": 16, "threshold_start": 0.8, "threshold_end": 0.8, **options},
        },
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "method", "options", "blocks"),
    [
        ("tiny", "InfLoRA", {}, "3 blocks (BertEmbeddings, BertLayer)"),
        ("tiny", "PLAN", {"pool": "weight_minor", "perturbation": "future"}, "3 blocks (BertEmbeddings, BertLayer)"),
        ("tiny_lm", "PLAN", {"perturbation": "conflict"}, "2 blocks (LlamaDecoderLayer)"),
    ],
    ids=["InfLoRA", "PLAN-weight_minor", "LM-PLAN"],
)
def test_a_continual_run_on_two_sharded_processes_ends_as_one_process(request, run, method, options, blocks):
    """The statistics passes, PLAN's perturbation hooks and its pool of the frozen weights' minor directions (read
    from the sharded weights), InfLoRA's designed ``A``, and a language model's generated answers all run on a
    backbone split over 2 processes: adapters, frozen stacks and head equal one process's, and so does the
    accuracy matrix."""
    tiny = request.getfixturevalue(run)
    callbacks = subspace_callbacks(method, **options)
    fit(tiny.config("single", trainer__callbacks=callbacks))
    printed = fit_in_processes(tiny.config("fsdp", trainer__callbacks=callbacks, **FSDP))
    assert f"backbone sharded over 2 processes: {blocks}" in printed
    single, sharded = tiny.last("single"), tiny.last("fsdp")
    assert_same_training(single, sharded)
    torch.testing.assert_close(tiny.matrix("fsdp"), tiny.matrix("single"), rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
def test_a_federated_run_on_two_sharded_processes_ends_as_one_process(tiny_fed):
    """Each rank trains its own clients on the sharded backbone (no gradient averaging), the round end gathers
    the uploads: the global adapters, head and every round's accuracy equal one process's."""
    fit(tiny_fed.config("single"))
    fit_in_processes(tiny_fed.config("fsdp", **FSDP))
    single, sharded = tiny_fed.last("single"), tiny_fed.last("fsdp")
    assert_same_training(single, sharded)
    rounds = [single["callbacks"]["FederatedRounds"]["history"], sharded["callbacks"]["FederatedRounds"]["history"]]
    assert [row["acc"] for row in rounds[1]] == pytest.approx([row["acc"] for row in rounds[0]], abs=0)


@pytest.mark.slow
def test_a_sharded_run_resumes_from_its_adapter_only_checkpoint(tiny):
    """The checkpoint of a sharded run is one file holding the adapters and head only; resumed on 2 processes
    after the first task, the run ends as the uninterrupted single process does."""
    callbacks = subspace_callbacks("InfLoRA")
    fit(tiny.config("single", trainer__callbacks=callbacks))
    config = tiny.config("fsdp", trainer__callbacks=callbacks, **FSDP)
    fit_in_processes(config, "--trainer.max_epochs", "1")
    checkpoint = tiny.checkpoints("fsdp") / "task-epoch=0.ckpt"
    assert checkpoint.is_file()
    assert not any(key.startswith("backbone.") and key.endswith("weight") for key in tiny.last("fsdp")["state_dict"])
    fit_in_processes(config, "--ckpt_path", str(checkpoint))
    assert_same_training(tiny.last("single"), tiny.last("fsdp"))
    torch.testing.assert_close(tiny.matrix("fsdp"), tiny.matrix("single"), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "strategy",
    [
        "fsdp",
        "fsdp_cpu_offload",
        "lightning.pytorch.strategies.FSDPStrategy",
        "lightning.pytorch.strategies.ModelParallelStrategy",
    ],
)
def test_a_strategy_that_cannot_shard_plans_models_is_named_with_the_valid_ones(tiny, strategy):
    """Lightning's FSDP1 and a plain ModelParallelStrategy are refused before any process starts."""
    value = strategy if "." not in strategy else {"class_path": strategy}
    with pytest.raises(ConfigError, match=r"trainer.strategy .*cannot shard plan's models.*valid: 'fsdp2'"):
        fit(tiny.config(trainer__strategy=value, trainer__devices=2))


@pytest.mark.slow
def test_an_evaluation_set_smaller_than_the_processes_is_refused_not_waited_on(tiny):
    """3 processes, 2 test examples per task: one process would have no batch to run while the others wait for
    it in their first forward pass; the run stops with a message instead."""
    source = {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 6, "test_per_class": 1}}
    config = tiny.config(trainer__strategy="fsdp2", trainer__devices=3, data__init_args__source=source)
    result = plan_in_processes("fit", "--config", str(config), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "a data loader has [0, 1, 1] batches on the 3 processes" in result.stderr


@pytest.mark.slow
def test_a_statistics_pass_smaller_than_the_processes_is_refused_not_waited_on(tiny):
    """PLAN reading 1 example per statistics pass on 2 sharded processes: one would sit the pass out while the
    other waits for it in its first forward pass; the run stops with a message naming max_examples instead."""
    config = tiny.config(
        trainer__strategy="fsdp2", trainer__devices=2, trainer__callbacks=subspace_callbacks("PLAN", max_examples=1)
    )
    result = plan_in_processes("fit", "--config", str(config), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "a data loader has [0, 1] batches on the 2 processes" in result.stderr
    assert "max_examples" in result.stderr


def test_a_backbone_without_transformer_blocks_cannot_be_sharded():
    """FSDP2 shards a model block by block; a backbone that names no blocks is refused with what would work."""
    with pytest.raises(ConfigError, match=r"model.backbone 'mine' \(Sequential\) cannot be sharded.*LlamaDecoderLayer"):
        transformer_blocks(nn.Sequential(nn.Linear(4, 4)), "'mine'")


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_every_rank_evaluates_in_as_many_batches_and_together_they_see_every_example_once(world, batch_size):
    """Sharded ranks run each forward pass together, so their evaluation loaders must be equally long; the
    shares stay exact (no example twice, none left out), and one process keeps plain chunks of the batch size."""
    for count in range(world, 30):
        indices = list(range(100, 100 + count))
        ranks = [eval_batches(indices, batch_size, r, world) for r in range(world)]
        assert len({len(batches) for batches in ranks}) == 1, (count, ranks)
        assert sorted(i for batches in ranks for batch in batches for i in batch) == indices
        assert all(batch and len(batch) <= batch_size + 1 for batches in ranks for batch in batches)
        single = eval_batches(indices, batch_size, 0, 1)
        assert single == [indices[i : i + batch_size] for i in range(0, count, batch_size)]
