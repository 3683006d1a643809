"""End-to-end federated runs of ``plan fit`` on a tiny random model: rounds, aggregation, faults, resume, DDP,
heterogeneous ranks and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import plan_in_processes
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from plan.aggregation import ClientUpdate, GlobalState, client_weights, flexlora, ideal_update, make_rule
from plan.callbacks import FederatedRounds
from plan.callbacks.federated import load_state
from plan.cli import run_cli
from plan.lora import LoRAConfig, LoRALinear

RULE_CALLBACK = "trainer__callbacks"


def fit(config, *extra: str):
    return run_cli(["fit", "--config", str(config), *extra])


def rounds_callback(**init_args) -> list[dict]:
    return [{"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": "fedit", **init_args}}]


def slots(checkpoint: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The global adapters in a checkpoint's model state, by LoRA layer name."""
    state = checkpoint["state_dict"]
    names = sorted(k[len("backbone.") : -len(".lora_A")] for k in state if k.endswith(".lora_A"))
    return {n: (state[f"backbone.{n}.lora_A"], state[f"backbone.{n}.lora_B"]) for n in names}


def client_updates(checkpoint: dict) -> list[ClientUpdate]:
    stored = checkpoint["callbacks"]["FederatedRounds"]["clients"]
    return [
        ClientUpdate(d["client"], d["num_samples"], {k: tuple(v) for k, v in d["adapters"].items()}, d["head"])
        for d in stored.values()
    ]


def test_fit_runs_rounds_and_logs_accuracy_traffic_and_partition(tiny_fed):
    config = tiny_fed.config(data__init_args__rounds=4)
    fit(config)
    names = sorted(p.name for p in tiny_fed.checkpoints().iterdir())
    assert names == ["last.ckpt"] + [f"round-epoch={r}.ckpt" for r in range(4)]
    events = EventAccumulator(
        str(tiny_fed.root / "run" / "tiny" / "v"), size_guidance={"scalars": 0, "images": 0}
    ).Reload()
    accuracy = [e.value for e in events.Scalars("fed/acc")]
    assert [e.step for e in events.Scalars("fed/acc")] == [1, 2, 3, 4]
    assert accuracy[-1] > 2 / 6, accuracy  # chance is 1/6
    # FedIT sends r (d_in + d_out) floats per layer each way, plus the head (32 x 6 + 6), 4 bytes each, 4 clients.
    per_client = 4 * (4 * 4 * (32 + 32) + 32 * 6 + 6)
    assert [e.value for e in events.Scalars("fed/bytes_up")] == [4 * per_client] * 4
    assert [e.value for e in events.Scalars("fed/bytes_down")] == [4 * per_client] * 4
    assert "fed/label_histogram" in events.Tags()["images"]
    assert all(0 < e.value < 1 for e in events.Scalars("fed/cosine_to_ideal"))  # FedIT is inexact
    validate = run_cli(["validate", "--config", str(config), "--ckpt_path", str(tiny_fed.checkpoints() / "last.ckpt")])
    assert validate.trainer.callback_metrics["val/acc"].item() == pytest.approx(accuracy[-1], abs=1e-6)


@pytest.mark.parametrize("rule", ["fedit", "ffa_lora", "flexlora", "flora"])
def test_the_global_adapter_is_the_rule_applied_to_the_round_uploads(tiny_fed, rule):
    """After one round the model holds exactly what the pure rule makes of the stored client uploads."""
    fit(tiny_fed.config(**{RULE_CALLBACK: rounds_callback(aggregation=rule)}), "--trainer.max_epochs", "1")
    checkpoint = tiny_fed.last()
    updates = sorted(client_updates(checkpoint), key=lambda u: u.client)
    assert len(updates) == 4
    model = slots(checkpoint)
    scale = 8 / 4
    state = make_rule(rule).aggregate(updates, None, scale, 4) if rule != "ffa_lora" else None
    for name, (a, b) in model.items():
        if rule == "fedit":
            torch.testing.assert_close((a, b), state.adapters[name], rtol=0, atol=1e-7)
        elif rule == "ffa_lora":  # A never moved; B is the weighted average, so the update is exactly the ideal one
            assert all(torch.equal(u.adapters[name][0], a) for u in updates)
            torch.testing.assert_close(
                scale * (b.double() @ a.double()), ideal_update(updates, name, scale), rtol=0, atol=1e-6
            )
        elif rule == "flexlora":
            torch.testing.assert_close((a, b), flexlora(updates, 4).adapters[name], rtol=0, atol=1e-6)
        else:  # FLoRA: the exact update went into the frozen stack and the slot restarted with B = 0
            past_A = checkpoint["state_dict"][f"backbone.{name}.past_A"]
            past_B = checkpoint["state_dict"][f"backbone.{name}.past_B"]
            torch.testing.assert_close(
                past_B.double() @ past_A.double(), ideal_update(updates, name, scale), rtol=0, atol=1e-6
            )
            assert not b.any()
    head = checkpoint["state_dict"]["head.weight"]
    p = client_weights(updates).tolist()
    torch.testing.assert_close(head, sum(w * u.head["weight"] for w, u in zip(p, updates)), rtol=0, atol=1e-6)


def test_lora_fair_lands_closer_to_the_ideal_update_than_fedit(tiny_fed):
    """Same seed, same round-0 clients: LoRA-FAIR's corrected B moves the global update's direction toward
    sum_k p_k B_k A_k beyond FedIT's average; FFA-LoRA meets it exactly."""
    measured = {}
    for rule in ("fedit", "lora_fair", "ffa_lora"):
        aggregation = (
            {"class_path": "plan.aggregation.LoRAFAIR", "init_args": {"steps": 300}} if rule == "lora_fair" else rule
        )
        cli = fit(
            tiny_fed.config(rule, **{RULE_CALLBACK: rounds_callback(aggregation=aggregation)}),
            "--trainer.max_epochs",
            "1",
        )
        measured[rule] = cli.trainer.callbacks[0].server.last_round
    assert measured["ffa_lora"]["cosine_to_ideal"] == pytest.approx(1.0, abs=1e-6)
    assert measured["ffa_lora"]["error_to_ideal"] == pytest.approx(0.0, abs=1e-3)
    assert measured["fedit"]["cosine_to_ideal"] < 0.9999
    assert measured["lora_fair"]["cosine_to_ideal"] > measured["fedit"]["cosine_to_ideal"]


@pytest.mark.parametrize("rule", ["fedit", "flora", "lora_fair"])
def test_resume_after_a_round_matches_the_uninterrupted_run(tiny_fed, rule):
    aggregation = (
        {"class_path": "plan.aggregation.LoRAFAIR", "init_args": {"steps": 50}} if rule == "lora_fair" else rule
    )
    callbacks = rounds_callback(aggregation=aggregation, dropout_prob=0.2)
    fit(tiny_fed.config("full", **{RULE_CALLBACK: callbacks}))
    fit(tiny_fed.config("part", **{RULE_CALLBACK: callbacks}), "--trainer.max_epochs", "1")
    fit(
        tiny_fed.config("part", **{RULE_CALLBACK: callbacks}),
        "--ckpt_path",
        str(tiny_fed.checkpoints("part") / "round-epoch=0.ckpt"),
    )
    full, part = tiny_fed.last("full"), tiny_fed.last("part")
    assert full["state_dict"].keys() == part["state_dict"].keys()
    for key in full["state_dict"]:
        torch.testing.assert_close(part["state_dict"][key], full["state_dict"][key], rtol=0, atol=0)
    server_part, server_full = part["callbacks"]["FederatedRounds"], full["callbacks"]["FederatedRounds"]
    assert {k: server_part[k] for k in ("rule", "seed", "rounds_closed")} == {
        k: server_full[k] for k in ("rule", "seed", "rounds_closed")
    }
    torch.testing.assert_close(
        (server_part["global"], server_part["clients"]), (server_full["global"], server_full["clients"]), rtol=0, atol=0
    )


def test_a_hundred_clients_keep_one_adapter_each_on_the_cpu(tiny_fed):
    source = {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 6, "train_per_class": 200}}
    config = tiny_fed.config(
        data__init_args__source=source,
        data__init_args__num_clients=100,
        data__init_args__clients_per_round=None,
        data__init_args__client_fraction=0.1,
        data__init_args__rounds=2,
    )
    cli = fit(config)
    datamodule, driver = cli.trainer.datamodule, cli.trainer.callbacks[0]
    sampled = {k for r in range(2) for k in datamodule.sampled_clients(r)}
    assert len(datamodule.sampled_clients(0)) == 10 and sorted(driver.server.clients) == sorted(sampled)
    assert sum(datamodule.client_sizes) == 1200 and min(datamodule.client_sizes) >= 2
    one_adapter = sum(p.numel() for layer in cli.model.lora_layers.values() for p in (layer.lora_A, layer.lora_B))
    for update in driver.server.clients.values():
        assert sum(a.numel() + b.numel() for a, b in update.adapters.values()) == one_adapter
        assert all(t.device.type == "cpu" for pair in update.adapters.values() for t in pair)


def test_client_sampling_and_partition_are_seeded(tiny_fed):
    a = run_cli(["--config", str(tiny_fed.config("a"))], run=False).datamodule
    b = run_cli(["--config", str(tiny_fed.config("b"))], run=False).datamodule
    c = run_cli(["--config", str(tiny_fed.config("c", data__init_args__seed=1))], run=False).datamodule
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.client_indices == b.client_indices and a.client_indices != c.client_indices
    assert [a.sampled_clients(r) for r in range(5)] == [b.sampled_clients(r) for r in range(5)]
    assert len({tuple(a.sampled_clients(r)) for r in range(5)}) > 1


@pytest.mark.parametrize(
    "kind, extra", [("iid", {}), ("shards", {"shards_per_client": 1}), ("domain", {"alpha": None})]
)
def test_every_partition_reaches_the_clients(tiny_fed, kind, extra):
    source = {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 6, "num_domains": 3}}
    config = tiny_fed.config(
        data__init_args__source=source,
        data__init_args__partition=kind,
        **{f"data__init_args__{k}": v for k, v in extra.items()},
    )
    datamodule = run_cli(["--config", str(config)], run=False).datamodule
    datamodule.setup("fit")
    train = datamodule.source.load("train")
    assert sorted(i for c in datamodule.client_indices for i in c) == list(range(len(train)))
    histogram = datamodule.label_histogram()
    if kind == "iid":
        assert max(datamodule.client_sizes) - min(datamodule.client_sizes) <= 1
    if kind == "shards":  # 6 shards of 48 examples over 6 classes of 48: one class per client
        assert ((histogram > 0).sum(1) == 1).all()
    if kind == "domain":
        assert all(len({train.domains[i] for i in c}) == 1 for c in datamodule.client_indices)


class PoisonClient(Callback):
    """Writes NaN into the LoRA slot during a client's local training (after each of its steps) in one round;
    ``client=None`` poisons every client of that round."""

    def __init__(self, client: int | None, round_index: int = 0) -> None:
        self.client, self.round_index = client, round_index

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.client in (None, int(batch["client"][0])) and trainer.current_epoch == self.round_index:
            with torch.no_grad():
                next(iter(pl_module.lora_layers.values())).lora_B.fill_(float("nan"))


def test_a_nan_client_is_excluded_and_the_round_goes_on(tiny_fed):
    cli = run_cli(["--config", str(tiny_fed.config()), "--trainer.max_epochs", "1"], run=False)
    victim = cli.datamodule.sampled_clients(0)[1]
    cli.trainer.callbacks.insert(0, PoisonClient(victim))
    with pytest.warns(UserWarning, match=f"round 0: client {victim} excluded: NaN/Inf in its update"):
        cli.trainer.fit(cli.model, cli.datamodule)
    driver = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FederatedRounds")
    assert driver.server.last_round["aggregated"] == 3 and driver.server.last_round["excluded"] == 1
    assert all(torch.isfinite(t).all() for pair in driver.server.server_state.adapters.values() for t in pair)


def test_dropped_clients_are_excluded_and_a_round_with_no_reply_keeps_the_old_adapters(tiny_fed):
    with pytest.warns(UserWarning, match="every client failed"):
        fit(tiny_fed.config(**{RULE_CALLBACK: rounds_callback(dropout_prob=0.999)}))
    for _, b in slots(tiny_fed.last()).values():
        assert not b.any()  # B starts at zero and no round ever aggregated anything
    with pytest.warns(UserWarning, match="excluded: dropped out"):
        fit(tiny_fed.config("half", **{RULE_CALLBACK: rounds_callback(dropout_prob=0.5)}))


def test_a_failed_round_after_a_flora_merge_changes_nothing(tiny_fed):
    """Round 1 has no usable reply: the stack merged in round 0 is not merged again, the slot not re-drawn."""
    config = tiny_fed.config(**{RULE_CALLBACK: rounds_callback(aggregation="flora")})
    cli = run_cli(["--config", str(config), "--trainer.max_epochs", "2"], run=False)
    cli.trainer.callbacks.insert(0, PoisonClient(None, round_index=1))
    with pytest.warns(UserWarning, match="round 1: every client failed"):
        cli.trainer.fit(cli.model, cli.datamodule)
    after_round_0 = torch.load(tiny_fed.checkpoints() / "round-epoch=0.ckpt", weights_only=False)["state_dict"]
    final = tiny_fed.last()["state_dict"]
    for key, value in after_round_0.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)


def test_heterogeneous_ranks_under_flora(tiny_fed):
    cli = fit(tiny_fed.config(**{RULE_CALLBACK: rounds_callback(aggregation="flora", client_ranks=[4, 2, 1])}))
    driver = cli.trainer.callbacks[0]
    for client, update in driver.server.clients.items():
        rank = [4, 2, 1][client % 3]
        assert all(a.shape[0] == rank and b.shape[1] == rank for a, b in update.adapters.values())
    stacked = sum([4, 2, 1][k % 3] for r in range(3) for k in cli.datamodule.sampled_clients(r))
    for layer in cli.model.lora_layers.values():
        assert layer.past_rank == min(stacked, 32)  # every round's stack merged; never wider than the layer


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data__init_args__num_clients": 1000}, r"1000 clients .* but the training split has 96"),
        ({"data__init_args__alpha": 0.0}, r"alpha must be > 0.*got 0.0"),
        ({RULE_CALLBACK: rounds_callback(aggregation="fedavg")}, r"unknown aggregation rule 'fedavg'"),
        (
            {RULE_CALLBACK: rounds_callback(aggregation="ffa_lora", train_A=True)},
            r"'ffa_lora' keeps A frozen.*train_A=True",
        ),
        (
            {RULE_CALLBACK: rounds_callback(client_ranks=[4, 2])},
            r"'fedit' needs every client at one rank, but client_ranks=\[4, 2\]",
        ),
        (
            {RULE_CALLBACK: rounds_callback(aggregation="flora", client_ranks=[8])},
            r"client_ranks \[8\] do not fit the model's LoRA rank 4",
        ),
    ],
)
def test_bad_federated_input_is_named(tiny_fed, overrides, message):
    with pytest.raises(ValueError, match=message):
        fit(tiny_fed.config(**overrides))


def test_drivers_refuse_the_other_scenario_and_too_many_epochs(tiny_fed, tiny):
    sequencer = [{"class_path": "plan.callbacks.TaskSequencer"}]
    with pytest.raises(
        ValueError, match="TaskSequencer needs a datamodule such as plan.datamodules.TaskSequenceDataModule"
    ):
        fit(tiny_fed.config(**{RULE_CALLBACK: sequencer}))
    with pytest.raises(
        ValueError, match="FederatedRounds needs a datamodule such as plan.datamodules.FederatedDataModule"
    ):
        fit(tiny.config(trainer__callbacks=rounds_callback()))
    with pytest.raises(ValueError, match="max_epochs=4 exceeds the 3 rounds"):
        fit(tiny_fed.config(), "--trainer.max_epochs", "4")


def test_checkpoints_do_not_cross_scenarios(tiny_fed, tiny):
    fit(tiny.config("continual"), "--trainer.max_epochs", "1")
    fit(tiny_fed.config("federated"), "--trainer.max_epochs", "1")
    # plan fit compares the run's settings first: another scenario means other callbacks and data
    with pytest.raises(ValueError, match="callback plan.callbacks.FederatedRounds: checkpoint '\\(not set\\)'"):
        fit(tiny_fed.config("federated"), "--ckpt_path", str(tiny.checkpoints("continual") / "last.ckpt"))
    with pytest.raises(ValueError, match="callback plan.callbacks.TaskSequencer: checkpoint '\\(not set\\)'"):
        fit(tiny.config("continual"), "--ckpt_path", str(tiny_fed.checkpoints("federated") / "last.ckpt"))
    with pytest.raises(ValueError, match="data.init_args.num_clients: checkpoint 6, requested 5"):
        fit(
            tiny_fed.config("other", data__init_args__num_clients=5),
            "--ckpt_path",
            str(tiny_fed.checkpoints("federated") / "last.ckpt"),
        )


def test_ddp_shards_clients_and_aggregates_like_one_process(tiny_fed):
    """2 CPU processes (gloo) train different clients without all-reducing gradients, gather the uploads at the
    round end, and end with the single process's global adapters."""
    callbacks = rounds_callback(aggregation="lora_fair", dropout_prob=0.2)
    callbacks[0]["init_args"]["aggregation"] = {"class_path": "plan.aggregation.LoRAFAIR", "init_args": {"steps": 50}}
    fit(tiny_fed.config("single", **{RULE_CALLBACK: callbacks}))
    config = tiny_fed.config("ddp", trainer__strategy="ddp", trainer__devices=2, **{RULE_CALLBACK: callbacks})
    result = plan_in_processes("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = tiny_fed.last("single"), tiny_fed.last("ddp")
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    assert sorted(ddp["callbacks"]["FederatedRounds"]["clients"]) == sorted(
        single["callbacks"]["FederatedRounds"]["clients"]
    )


def test_the_python_api_refuses_checkpoints_of_another_scenario_or_federation(tiny_fed, tiny):
    """Without the plan command's settings comparison, the driver and the datamodule still refuse."""
    fit(tiny.config("continual"), "--trainer.max_epochs", "1")
    fit(tiny_fed.config("federated"), "--trainer.max_epochs", "1")
    for config, checkpoint, message in (
        (tiny_fed.config("a"), tiny.checkpoints("continual"), "not written by a federated run"),
        (tiny.config("b"), tiny_fed.checkpoints("federated"), "not written by a continual-learning run"),
        (
            tiny_fed.config("c", data__init_args__num_clients=5),
            tiny_fed.checkpoints("federated"),
            "different federation.*num_clients",
        ),
    ):
        cli = run_cli(["--config", str(config)], run=False)
        with pytest.raises(ValueError, match=message):
            cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(checkpoint / "last.ckpt"))


@pytest.mark.parametrize("client_scale", ["run", "rank"])
def test_a_client_of_lower_rank_starts_from_the_global_change_and_uploads_its_own(client_scale: str) -> None:
    """A rank-2 client of a rank-4 run (alpha 8): with ``client_scale='rank'`` it trains at scale alpha / 2 = 4
    (FlexLoRA's official code) instead of 2. Either way its layer starts out computing the global adapter's
    first 2 components at the run's scale, and its upload, read at the run's scale, is the weight change the
    client's own layer makes."""
    g = torch.Generator().manual_seed(0)
    config = LoRAConfig(rank=4, alpha=8.0)
    layer = LoRALinear(nn.Linear(6, 5), config.rank, config.alpha)
    module = SimpleNamespace(lora_layers={"q": layer}, lora_config=config, head_parameters=dict)
    trainer = SimpleNamespace(optimizers=[], datamodule=SimpleNamespace(client_sizes=[3, 3]))
    rounds = FederatedRounds(aggregation="flexlora", client_ranks=[4, 2], client_scale=client_scale)
    a_g, b_g = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    rounds.server.global_state = GlobalState({"q": (a_g, b_g)}, {})
    x = torch.randn(7, 6, generator=g)

    rounds._start_client(trainer, module, client=1, batch_idx=0)
    expected_scale = 4.0 if client_scale == "rank" else 2.0
    assert layer.active_rank == 2 and layer.scale == expected_scale
    base = layer.base_layer(x).detach()
    torch.testing.assert_close(layer(x).detach() - base, 2.0 * x @ a_g[:2].T @ b_g[:, :2].T)

    with torch.no_grad():  # local training moves the slot
        layer.lora_A.add_(0.1 * torch.randn(4, 6, generator=g))
        layer.lora_B.add_(0.1 * torch.randn(5, 4, generator=g))
    change = (layer(x) - layer.base_layer(x)).detach()
    rounds._finish_client(trainer, module)
    (upload,) = rounds.round_updates
    a_up, b_up = upload.adapters["q"]
    assert a_up.shape == (2, 6) and b_up.shape == (5, 2)
    torch.testing.assert_close(change, 2.0 * x @ a_up.T @ b_up.T)

    load_state(module, rounds.server.server_state)  # the server's model is back at the run's rank and scale
    assert layer.active_rank == 4 and layer.scale == 2.0
