"""plan federations over Flower: the simulation and deployment engines end where ``plan fit``'s own simulation
ends, a killed client is excluded, a restarted server resumes, and mismatched clients or checkpoints are named.

The engine tests start every process in a session of its own and kill the whole session at the end (Ray's
workers, a SuperNode's ClientApp process, the SuperLink's ServerApp process), on 127.0.0.1 ports chosen free."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from plan.aggregation import GlobalState
from plan.cli import run_cli
from plan.errors import ConfigError
from plan.flower import (
    CHECKPOINT_FORMAT,
    Federation,
    PlanStrategy,
    check_node_settings,
    decode_global,
    encode_global,
    encode_update,
    train_client,
    write_app,
)

RULE_CALLBACK = "trainer__callbacks"
TOLERANCE = 1e-5  # Ray workers may run torch with another thread count: reductions in another order


def rounds_callback(rule: str, **init_args) -> list[dict]:
    return [{"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": rule, **init_args}}]


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0"}


def flower_simulation(config: Path, checkpoint: Path, timeout: int = 300) -> tuple[int, str]:
    """``python -m plan.flower simulate`` in a child process (Ray starts and stops with it): exit code, log."""
    command = [sys.executable, "-m", "plan.flower", "simulate", "--config", str(config)]
    with started([*command, "--checkpoint", str(checkpoint), "--num-cpus", "2"], checkpoint.with_suffix(".log")) as job:
        code = job.wait(timeout)
    return code, checkpoint.with_suffix(".log").read_text()


@contextmanager
def started(command: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """``command`` in a session of its own, output to ``log``; the session is killed on the way out."""
    with log.open("w") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env or ENV, start_new_session=True)
    try:
        yield job
    finally:
        kill(job)


def kill(job: subprocess.Popen) -> None:
    """Kill ``job`` and every process of its session (already gone is fine)."""
    with suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)


def flower_command(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def assert_same_server(flower: dict, plan_run: dict, atol: float) -> float:
    """Flower's server state equals ``plan fit``'s: global adapters, head and (FLoRA) frozen stack; the largest
    absolute difference."""
    ours, theirs = flower["server"]["global"], plan_run["callbacks"]["FederatedRounds"]["global"]
    assert flower["server"]["rounds_closed"] == plan_run["callbacks"]["FederatedRounds"]["rounds_closed"]
    worst = 0.0
    for name, (a, b) in theirs["adapters"].items():
        for got, want in zip(ours["adapters"][name], (a, b)):
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
            worst = max(worst, (got - want).abs().max().item())
    for name, want in theirs["head"].items():
        torch.testing.assert_close(ours["head"][name], want, rtol=0, atol=atol)
        worst = max(worst, (ours["head"][name] - want).abs().max().item())
    state = plan_run["state_dict"]
    for name, (past_a, past_b) in flower["stack"].items():
        want_a, want_b = state[f"backbone.{name}.past_A"], state[f"backbone.{name}.past_B"]
        assert past_a.shape == want_a.shape and past_b.shape == want_b.shape
        if past_a.numel():
            delta = past_b.double() @ past_a.double() - want_b.double() @ want_a.double()
            assert delta.abs().max().item() <= atol
            worst = max(worst, delta.abs().max().item())
    return worst


@pytest.mark.slow
def test_flower_simulation_ends_with_plan_fit_global_adapters(tiny_fed):
    """3 rounds of FedIT, 4 of 6 clients, in Flower's simulation engine (Ray) and in ``plan fit``, same seed:
    the same global adapters and head, up to float reduction order (FLoRA: the deployment test)."""
    config = tiny_fed.config(**{RULE_CALLBACK: rounds_callback("fedit")})
    run_cli(["fit", "--config", str(config)])
    checkpoint = tiny_fed.root / "server.pt"
    code, log = flower_simulation(config, checkpoint)
    assert code == 0, log[-4000:]
    worst = assert_same_server(torch.load(checkpoint, weights_only=False), tiny_fed.last(), TOLERANCE)
    print(
        f"fedit over Flower's simulation engine: largest difference to plan fit {worst:.3g} (tolerance {TOLERANCE:g})"
    )


STALL_CLIENT_1 = """
import time
from pathlib import Path

from plan.flower import client_app


def stall(msg, context, call_next):
    \"\"\"Client 1 says it has its last round's work, then hangs there until the test kills its SuperNode.\"\"\"
    if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 1:
        if msg.content.config_records["config"]["round"] == LAST_ROUND:
            Path(MARKER).touch()
            time.sleep(600)
    return call_next(msg, context)


app = client_app(mods=[stall])
"""


@pytest.mark.slow
def test_flower_deployment_ends_with_plan_fit_and_survives_a_killed_client(tiny_fed):
    """FLoRA, 2 clients, 2 rounds in Flower's deployment engine: a SuperLink and two SuperNodes (one per data
    partition) on 127.0.0.1. Client 1's SuperNode is killed in the middle of round 2; the round completes
    without it. Round 1 ends with ``plan fit``'s FLoRA stack; round 2 is FLoRA over client 0 alone: the stack
    grows by ``plan fit``'s round-2 upload of client 0, the head is that upload's, the slot is redrawn.

    Flower starts a ClientApp process per message, so a round takes a process start (imports, model build):
    the round timeout (60 s) allows for it on a busy 2-core machine."""
    config = tiny_fed.config(
        data__init_args__num_clients=2,
        data__init_args__clients_per_round=2,
        data__init_args__rounds=2,
        **{RULE_CALLBACK: rounds_callback("flora")},
    )
    run_cli(["fit", "--config", str(config)])
    root, port = tiny_fed.root, free_port()
    home, app, marker, checkpoint = root / "flwr", root / "app", root / "client-1-stalled", root / "server.pt"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    write_app(app, config, checkpoint, round_timeout=60, connect_timeout=120, clientapp="stall:app")
    (app / "stall.py").write_text(f"LAST_ROUND, MARKER = 1, {str(marker)!r}\n" + STALL_CLIENT_1)
    env = {**ENV, "FLWR_HOME": str(home)}
    link = [flower_command("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation"]
    with started([*link, "--port", str(port)], root / "superlink.log", env):
        nodes = [
            [
                flower_command("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={k}",
                "--max-wait-time",
                "120",
            ]
            for k in (0, 1)
        ]
        with started(nodes[0], root / "node0.log", env), started(nodes[1], root / "node1.log", env) as node1:
            run = [flower_command("flwr"), "run", str(app), "--stream"]
            with started(run, root / "run.log", env) as flwr_run:
                deadline = time.monotonic() + 240
                while not marker.exists() and flwr_run.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert marker.exists(), (root / "run.log").read_text()[-4000:]
                kill(node1)  # mid-round 2: client 1 holds its work and never replies
                flwr_run.wait(180)
    server = torch.load(checkpoint, weights_only=False)
    assert [(row["aggregated"], row["excluded"]) for row in server["server"]["history"]] == [(2, 0), (1, 1)]
    plan_round_1 = torch.load(tiny_fed.checkpoints() / "round-epoch=0.ckpt", weights_only=False)["state_dict"]
    plan_end = tiny_fed.last()
    client_0 = plan_end["callbacks"]["FederatedRounds"]["clients"][0]
    flower_global, plan_global = server["server"]["global"], plan_end["callbacks"]["FederatedRounds"]["global"]
    torch.testing.assert_close(flower_global["adapters"], plan_global["adapters"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(flower_global["head"], client_0["head"], rtol=0, atol=TOLERANCE)
    scale, worst = 8 / 4, 0.0  # the tiny run's alpha / rank
    for name, (past_a, past_b) in server["stack"].items():
        a0, b0 = client_0["adapters"][name]
        want = plan_round_1[f"backbone.{name}.past_B"] @ plan_round_1[f"backbone.{name}.past_A"] + scale * b0 @ a0
        worst = max(worst, (past_b @ past_a - want).abs().max().item())
    assert worst <= TOLERANCE
    print(f"flora over Flower's deployment engine, client 1 killed in round 2: stack off by {worst:.3g}")


class InProcessNodes:
    """Flower's ``Grid`` as the strategy uses it, with every client trained in this process: for the server's
    own logic (resume), which needs no engine."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation

    def send_and_receive(self, messages: list, timeout: float) -> list:
        replies = []
        for message in messages:
            settings = message.content.config_records["config"]
            state = decode_global(self.federation.model, message.content.array_records["arrays"].to_torch_state_dict())
            update = train_client(self.federation, state, settings["client"], settings["round"], settings["seed"])
            metrics = MetricRecord({"client": update.client, "num-examples": update.num_samples})
            content = RecordDict({"arrays": ArrayRecord(encode_update(update)), "metrics": metrics})
            meta = SimpleNamespace(src_node_id=message.metadata.dst_node_id)
            replies.append(SimpleNamespace(metadata=meta, content=content, has_error=lambda: False))
        return replies


@pytest.mark.slow
def test_a_restarted_flower_server_resumes_where_it_stopped(tiny_fed, monkeypatch):
    """A server stopped after round 2 of FLoRA and restarted from its checkpoint ends round 3 where ``plan fit``
    ends (global adapters, head, stack)."""
    for key in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process is given by its SuperLink
        monkeypatch.setattr(TaskIdentity, key, 1)
    config = tiny_fed.config(**{RULE_CALLBACK: rounds_callback("flora")})
    run_cli(["fit", "--config", str(config)])
    clients, checkpoint = InProcessNodes(Federation.load(config)), tiny_fed.root / "server.pt"

    def serve(rounds: range) -> PlanStrategy:
        strategy = PlanStrategy(Federation.load(config), checkpoint)
        strategy.start_state()
        strategy.nodes = {k: 100 + k for k in range(strategy.federation.num_clients)}
        for server_round in rounds:
            arrays = ArrayRecord(encode_global(strategy.federation.model, strategy.server.server_state))
            messages = strategy.configure_train(server_round, arrays, None, clients)
            strategy.aggregate_train(server_round, clients.send_and_receive(messages, 60))
        return strategy

    assert serve(range(1, 3)).server.rounds_closed == 2
    assert serve(range(3, 4)).server.rounds_closed == 3
    worst = assert_same_server(torch.load(checkpoint, weights_only=False), tiny_fed.last(), TOLERANCE)
    print(f"resumed flora server: largest difference to plan fit {worst:.3g}")


def test_global_state_travels_unchanged(tiny_fed):
    """What the server sends decodes to the state it holds, FLoRA stack included."""
    federation = Federation.load(tiny_fed.config(**{RULE_CALLBACK: rounds_callback("flora")}))
    model = federation.model
    layer = next(iter(model.lora_layers.values()))
    layer.absorb(torch.randn(3, layer.in_features), torch.randn(layer.out_features, 3))
    state = GlobalState(
        {n: (torch.randn_like(lay.lora_A), torch.randn_like(lay.lora_B)) for n, lay in model.lora_layers.items()},
        {n: torch.randn_like(p) for n, p in model.head_parameters().items()},
    )
    stack = (layer.past_A.clone(), layer.past_B.clone())
    arrays = encode_global(model, state)
    layer.past_A, layer.past_B = layer.past_A[:0], layer.past_B[:, :0]
    decoded = decode_global(model, arrays)
    torch.testing.assert_close((layer.past_A, layer.past_B), stack, rtol=0, atol=0)
    torch.testing.assert_close((decoded.adapters, decoded.head), (state.adapters, state.head), rtol=0, atol=0)


def test_a_node_of_another_federation_is_named(tiny_fed):
    server = Federation.load(tiny_fed.config("server")).settings()
    node = Federation.load(tiny_fed.config("node", model__init_args__lora__rank=8, data__init_args__seed=3)).settings()
    with pytest.raises(ConfigError, match=r"(?s)node 7 \(client 1\).*data\.seed: 3 != 0.*lora\.rank: 8 != 4"):
        check_node_settings(server, {**node, "client": 1}, 7)
    with pytest.raises(ConfigError, match=r"partition-id: 6 is not a client id in 0\.\.5"):
        check_node_settings(server, {**server, "client": 6}, 7)
    assert check_node_settings(server, {**server, "client": 5}, 7) == 5


def test_a_server_resumed_with_another_federations_state_is_named(tiny_fed):
    checkpoint = tiny_fed.root / "server.pt"
    strategy = PlanStrategy(Federation.load(tiny_fed.config("a")), checkpoint)
    strategy.start_state()
    strategy.save()
    assert torch.load(checkpoint, weights_only=False)["format"] == CHECKPOINT_FORMAT
    other = Federation.load(
        tiny_fed.config("b", data__init_args__num_clients=5, **{RULE_CALLBACK: rounds_callback("flora")})
    )
    with pytest.raises(
        ConfigError, match=r"(?s)another federation.*aggregation: checkpoint 'fedit'.*data\.num_clients: 6 != 5"
    ):
        PlanStrategy(other, checkpoint).start_state()
