"""Several nodes, as Lightning's environment variables describe them: two "nodes" of one process each on
127.0.0.1 end a continual and a federated run like one process does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_FEDERATED_RUN, TinyRun, fit_on_two_nodes, free_port

from plan.cli import run_cli
from plan.errors import ConfigError


@pytest.mark.slow
def test_a_continual_run_on_two_nodes_matches_one_process(tiny) -> None:
    """Dropout off: the same global batches, the same adapters up to float32 rounding of the all-reduce."""
    run_cli(["fit", "--config", str(tiny.config("single"))])
    fit_on_two_nodes(tiny.config("nodes"))
    one, two = tiny.last("single")["state_dict"], tiny.last("nodes")["state_dict"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(tiny.matrix("nodes"), tiny.matrix("single"), rtol=0, atol=1 / 16, equal_nan=True)


@pytest.mark.slow
def test_a_federation_sharded_over_two_nodes_matches_one_process(tmp_path) -> None:
    """Clients are spread over the ranks of both nodes; with LoRA dropout on, every client trains as in one
    process (its steps draw from its own seeds), so the global adapters agree to float32 rounding."""
    run = TinyRun(tmp_path, TINY_FEDERATED_RUN)
    lora = {"rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["query", "value"]}
    overrides = {"model__init_args__lora": lora, "model__init_args__backbone_config": TINY_BERT}
    run_cli(["fit", "--config", str(run.config("single", **overrides))])
    fit_on_two_nodes(run.config("nodes", **overrides))
    one, two = run.last("single"), run.last("nodes")
    for key in one["state_dict"]:
        torch.testing.assert_close(two["state_dict"][key], one["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for name, (a, b) in one["callbacks"]["FederatedRounds"]["global"]["adapters"].items():
        got_a, got_b = two["callbacks"]["FederatedRounds"]["global"]["adapters"][name]
        torch.testing.assert_close(got_a, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_b, b, rtol=0, atol=1e-6)


def test_several_nodes_without_a_node_environment_are_refused(tiny, monkeypatch) -> None:
    """num_nodes > 1 started by hand with no NODE_RANK (nor SLURM or torchrun) would wait forever for the
    other nodes: refused before any work, naming what to set."""
    for variable in ("NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match="trainer.num_nodes=2 needs every node started with MASTER_ADDR"):
        run_cli(["fit", "--config", str(tiny.config()), "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"])


@pytest.mark.slow
def test_the_torchrun_script_starts_a_run_like_one_process(tiny) -> None:
    """scripts/torchrun.sh on one node with 2 processes: the same adapters as one process (dropout off)."""
    run_cli(["fit", "--config", str(tiny.config("single"))])
    env = {**os.environ, "PROCS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).resolve().parent.parent / "scripts" / "torchrun.sh"
    result = subprocess.run(
        ["bash", str(script), str(tiny.config("torchrun"))], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = tiny.last("single")["state_dict"], tiny.last("torchrun")["state_dict"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
