"""Real federations over Flower: plan's aggregation rules as a Flower strategy, its Lightning client as a Flower
client app.

``plan fit`` simulates a federation inside one process (or one DDP job): every client shares one model and the
round end is a function call. Flower runs the same federation with the server and each client in processes of
their own, in its simulation engine (Ray actors on one machine or a Ray cluster) or its deployment engine (a
SuperLink and SuperNodes talking gRPC across machines and organisations). Both sides here build the run from the
same plan YAML and run the very code ``FederatedRounds`` runs in one ``fit``:

* a client (:func:`train_client`) trains its local steps with a Lightning ``Trainer`` on its own partition,
  started, seeded step by step and read back by :class:`plan.callbacks.federated.ClientTraining`;
* the server (:class:`PlanStrategy`) samples the round's clients as the datamodule does, and closes the round
  with :class:`plan.callbacks.federated.FederationServer`: fault screening, the aggregation rule, the FLoRA
  merge into the global model's frozen stack, the client store. It checkpoints all of it after every round,
  so a restarted server resumes where it stopped.

With the same seed, N rounds over Flower therefore end with the global adapters of ``plan fit``'s simulation.
A client is identified by its node's ``partition-id`` (its client id in the plan federation); at the start the
server asks every node for it and for the settings its config gives (data, LoRA), and refuses a node whose
settings differ from its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from plan.aggregation import ClientUpdate, GlobalState
from plan.callbacks.federated import (
    DROPPED,
    ClientTraining,
    FederatedRounds,
    FederationServer,
    check_client_ranks,
    format_rounds,
    load_state,
    local_step_seed,
)
from plan.callbacks.sequencer import run_seed
from plan.datamodules.federated import ClientRoundSampler, ClientTagged, FederatedDataModule
from plan.errors import ConfigError, require
from plan.seeding import reseed

PLAN_CONFIG = "plan-config"  # run config (or a node's own node config): the plan YAML of the federation
PARTITION_ID = "partition-id"  # node config: the node's client id in the plan federation
CHECKPOINT_FORMAT = "plan.flower server 1"
TRAINER_KEYS = ("accelerator", "precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


# -- one process's view of a plan federated config ----------------------------------------------------------


class ClientRoundData(pl.LightningDataModule):
    """The federation's data as one process sees it: for a client, its own batches of one round, dealt exactly
    as the simulation deals them; everything else (layout, tokenizer, validation) is the federation's."""

    def __init__(self, data: FederatedDataModule) -> None:
        super().__init__()
        self.data = data
        self.client, self.round_index = 0, 0

    def __getattr__(self, name: str) -> Any:
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer  # the data encodes with the tokenizer of the model being trained
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        data = self.data
        sampler = ClientRoundSampler(
            [self.client],
            data.client_indices,
            data.batch_size,
            data.seed,
            self.round_index,
            data.local_epochs,
            data.local_steps,
        )
        return DataLoader(
            ClientTagged(data._train),
            batch_sampler=sampler,
            collate_fn=data.collate_fn,
            num_workers=data.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self.data.val_dataloader()


@dataclass
class Federation:
    """A plan federated config as one process builds it: the model, the partitioned data, the round settings
    (the config's ``FederatedRounds``) and the trainer settings a client's local training keeps."""

    config: str
    model: pl.LightningModule
    data: ClientRoundData
    rounds: FederatedRounds
    trainer_settings: dict

    @classmethod
    def load(cls, config: str | Path) -> Federation:
        from plan.cli import run_cli

        config = str(config)
        require(Path(config).is_file(), f"{PLAN_CONFIG}: no plan config at {config!r}; give the path of a YAML file")
        cli = run_cli(["--config", config], run=False)
        rounds = [cb for cb in cli.trainer.callbacks if isinstance(cb, FederatedRounds)]
        require(
            len(rounds) == 1 and isinstance(cli.datamodule, FederatedDataModule),
            f"{config}: a Flower federation needs a federated plan config (data plan.datamodules.FederatedDataModule "
            "and one plan.callbacks.FederatedRounds in trainer.callbacks), as configs/federated/*.yaml",
        )
        trainer = cli.config.get("trainer")
        settings = {k: trainer[k] for k in TRAINER_KEYS if trainer and trainer.get(k) is not None}
        federation = cls(config, cli.model, ClientRoundData(cli.datamodule), rounds[0], settings)
        federation.trainer().validate(federation.model, datamodule=federation.data, verbose=False)  # setup only
        check_client_ranks(rounds[0].server.rule, rounds[0].client.client_ranks, federation.model.lora_config.rank)
        for layer in federation.model.lora_layers.values():
            layer.lora_A.requires_grad_(rounds[0].train_A)
        return federation

    def trainer(self, callbacks: list[Callback] | None = None, epochs: int = 0) -> pl.Trainer:
        """A quiet one-device trainer: ``epochs=1`` runs a client's local steps, 0 only sets the model up."""
        return pl.Trainer(
            **self.trainer_settings,
            devices=1,
            max_epochs=epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks or [],
        )

    @property
    def num_clients(self) -> int:
        return self.data.data.num_clients

    def settings(self) -> dict:
        """What must agree between the server and every client: the data partition, LoRA, the backbone."""
        lora = self.model.lora_config
        return {
            "data": self.data.data.fingerprint(),
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
            "backbone": backbone_digest(self.model),
        }


_LOADED: dict[tuple[str, float], Federation] = {}


def federation_for(config: str) -> Federation:
    """The process's federation for ``config``, built once (a Flower worker handles many messages)."""
    key = (str(Path(config).resolve()), Path(config).stat().st_mtime if Path(config).is_file() else 0.0)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = Federation.load(config)
    return _LOADED[key]


def backbone_digest(model: pl.LightningModule) -> str:
    """A short hash of the frozen backbone weights: a client must train the model the server aggregates for."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        if not name.endswith(("lora_A", "lora_B", "past_A", "past_B")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# -- what travels: global state down, a client's update up --------------------------------------------------


def encode_global(model: pl.LightningModule, state: GlobalState) -> dict[str, Tensor]:
    """The global adapters, head and frozen stack (FLoRA's merged rounds) as named tensors."""
    arrays = {}
    for name, (a, b) in state.adapters.items():
        arrays[f"adapter.{name}.A"], arrays[f"adapter.{name}.B"] = a, b
    for name, layer in model.lora_layers.items():
        arrays[f"stack.{name}.A"], arrays[f"stack.{name}.B"] = layer.past_A.cpu(), layer.past_B.cpu()
    arrays.update({f"head.{name}": t for name, t in state.head.items()})
    return arrays


def decode_global(model: pl.LightningModule, arrays: dict[str, Tensor]) -> GlobalState:
    """The inverse of :func:`encode_global`; the frozen stack goes straight into the model's layers."""
    for name, layer in model.lora_layers.items():
        layer.past_A = arrays[f"stack.{name}.A"].to(layer.past_A)
        layer.past_B = arrays[f"stack.{name}.B"].to(layer.past_B)
    adapters = {name: (arrays[f"adapter.{name}.A"], arrays[f"adapter.{name}.B"]) for name in model.lora_layers}
    head = {key[len("head.") :]: t for key, t in arrays.items() if key.startswith("head.")}
    return GlobalState(adapters, head)


def encode_update(update: ClientUpdate) -> dict[str, Tensor]:
    arrays = {}
    for name, (a, b) in update.adapters.items():
        arrays[f"adapter.{name}.A"], arrays[f"adapter.{name}.B"] = a, b
    arrays.update({f"head.{name}": t for name, t in update.head.items()})
    return arrays


def decode_update(client: int, num_samples: int, arrays: dict[str, Tensor]) -> ClientUpdate:
    layers = sorted({key[len("adapter.") : -2] for key in arrays if key.startswith("adapter.")})
    adapters = {name: (arrays[f"adapter.{name}.A"], arrays[f"adapter.{name}.B"]) for name in layers}
    head = {key[len("head.") :]: t for key, t in arrays.items() if key.startswith("head.")}
    return ClientUpdate(client, num_samples, adapters, head)


# -- the client ---------------------------------------------------------------------------------------------


class OneClientRound(Callback):
    """Makes a one-epoch ``fit`` one client's local training in one round, with ``FederatedRounds``' own client
    code: the same start, the same per-step seeds, the same upload."""

    def __init__(self, training: ClientTraining, state: GlobalState, client: int, round_index: int, seed: int) -> None:
        self.training, self.state, self.client, self.round_index, self.seed = training, state, client, round_index, seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training.start(pl_module, trainer.optimizers, self.state, self.client)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        reseed(local_step_seed(self.seed, self.round_index, self.client, batch_idx))


def train_client(federation: Federation, state: GlobalState, client: int, round_index: int, seed: int) -> ClientUpdate:
    """Client ``client``'s local training in round ``round_index`` from the global ``state``: its upload."""
    data = federation.data
    data.client, data.round_index = client, round_index
    callback = OneClientRound(federation.rounds.client, state, client, round_index, seed)
    federation.trainer([callback], epochs=1).fit(federation.model, datamodule=data)
    return federation.rounds.client.finish(federation.model, client, data.data.client_sizes[client])


def client_id(context: Any, federation: Federation) -> int:
    """The node's client id in the plan federation, from its node config ``partition-id``."""
    value = context.node_config.get(PARTITION_ID)
    valid = f"0..{federation.num_clients - 1} (data.num_clients={federation.num_clients})"
    require(
        value is not None,
        f"Flower node config has no {PARTITION_ID!r}: start the SuperNode with --node-config '{PARTITION_ID}=K' for K in {valid}",
    )
    require(
        isinstance(value, int) and 0 <= value < federation.num_clients,
        f"Flower node config {PARTITION_ID}={value!r} is not a client of the federation: valid are {valid}",
    )
    return int(value)


def config_path(context: Any) -> str:
    """The plan YAML: the node's own (node config), else the run's (run config)."""
    path = context.node_config.get(PLAN_CONFIG) or context.run_config.get(PLAN_CONFIG)
    require(
        bool(path),
        f"no {PLAN_CONFIG!r} in the Flower run config or node config: pass the plan YAML, e.g. "
        f"flwr run --run-config \"{PLAN_CONFIG}='configs/federated/fedit.yaml'\"",
    )
    return str(path)


def client_app(config: str | None = None, mods: list | None = None):
    """A Flower ``ClientApp`` for the plan federation in ``config`` (default: the run or node config's
    ``plan-config``): it answers the server's settings query and trains its partition's local steps.
    ``mods`` are Flower client mods (e.g. ``flwr.clientapp.mod.LocalDpMod``), run around every message."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=mods)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        federation = federation_for(config or config_path(context))
        settings = {**federation.settings(), "client": client_id(context, federation)}
        return Message(RecordDict({"settings": ConfigRecord({"json": json.dumps(settings)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        federation = federation_for(config or config_path(context))
        client = client_id(context, federation)
        settings = msg.content.config_records["config"]
        if settings["client"] != client:
            raise ConfigError(f"this node is client {client}, but the server sent client {settings['client']!r}'s work")
        state = decode_global(federation.model, msg.content.array_records["arrays"].to_torch_state_dict())
        round_index, seed = settings["round"], settings["seed"]
        assert isinstance(round_index, int) and isinstance(seed, int)  # as configure_train sends them
        update = train_client(federation, state, client, round_index, seed)
        metrics = MetricRecord({"client": client, "num-examples": update.num_samples})
        return Message(RecordDict({"arrays": ArrayRecord(encode_update(update)), "metrics": metrics}), reply_to=msg)

    return app


# -- the server ---------------------------------------------------------------------------------------------


class PlanStrategy:
    """plan's aggregation as a Flower strategy: the round's clients sampled as ``plan fit`` samples them, the
    round closed by ``FederatedRounds``' own server code, the server's state checkpointed after every round.

    Args:
        federation: the server's build of the plan config (its model holds the global state).
        checkpoint: file the server state is written to after every round and resumed from if it exists.
        timeout: seconds a round waits for its replies; a client that has not replied by then is excluded.
    """

    def __init__(self, federation: Federation, checkpoint: str | Path | None = None, timeout: float = 600.0) -> None:
        self.federation, self.timeout = federation, timeout
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.server = federation.rounds.server  # the config's own server: its rule, fault settings and seed
        self.server.seed = run_seed(self.server.seed)
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.sent: dict[int, int] = {}  # the round's clients -> node, as configured

    # -- the federation's nodes ---------------------------------------------------------------------------

    def connect(self, grid: Any, wait: float) -> None:
        """Wait for one node per client, ask each for its settings, and refuse any that differ from the server's."""
        from flwr.app import Message, MessageType, RecordDict

        wanted = self.federation.num_clients
        deadline = time.monotonic() + wait
        while len(nodes := list(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{len(nodes)} Flower nodes connected within {wait:g} s, but data.num_clients={wanted}: start one "
                    f"SuperNode per client (node config {PARTITION_ID}=0..{wanted - 1})"
                )
            time.sleep(0.2)
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=wait))
        mine = self.federation.settings()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ConfigError(f"Flower node {node} could not build the plan federation: {reply.error.reason}")
            theirs = json.loads(reply.content["settings"]["json"])
            client = check_node_settings(mine, theirs, node)
            if client in self.nodes:
                raise ConfigError(
                    f"Flower nodes {self.nodes[client]} and {node} both say {PARTITION_ID}={client}; give each node "
                    f"its own client id in 0..{wanted - 1}"
                )
            self.nodes[client] = node
        missing = sorted(set(range(wanted)) - set(self.nodes))
        require(not missing, f"no Flower node answered for clients {missing} within {wait:g} s")

    # -- Flower's strategy interface ----------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list:
        """One message per sampled client, to its node: the global state and (round, client, seed)."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        round_index = server_round - 1
        self.sent = {k: self.nodes[k] for k in self.federation.data.data.sampled_clients(round_index)}
        messages = []
        for client, node in self.sent.items():
            settings = ConfigRecord({"round": round_index, "client": client, "seed": int(self.server.seed or 0)})
            content = RecordDict({"arrays": arrays, "config": settings})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        """Close the round with ``FederatedRounds``' server code; a sampled client without a usable reply is
        excluded and named."""
        from flwr.app import ArrayRecord, MetricRecord

        round_index, model = server_round - 1, self.federation.model
        updates, excluded = [], {}
        for reply in replies:
            node = reply.metadata.src_node_id
            clients = [k for k, n in self.sent.items() if n == node]
            if not clients:
                continue
            if reply.has_error():
                excluded[clients[0]] = f"its node {node} failed: {reply.error.reason}"
                continue
            metrics = reply.content.metric_records["metrics"]
            arrays = reply.content.array_records["arrays"].to_torch_state_dict()
            update = decode_update(int(metrics["client"]), int(metrics["num-examples"]), arrays)
            if self.server.drops(round_index, update.client):
                excluded[update.client] = DROPPED
            else:
                updates.append(update)
        answered = {u.client for u in updates} | set(excluded)
        for client in sorted(set(self.sent) - answered):
            excluded[client] = f"no reply from node {self.sent[client]} within {self.timeout:g} s"
        updates.sort(key=lambda u: u.client)
        rank = model.lora_config.rank
        client_ranks = self.federation.rounds.client
        self.server.close_round(
            model, round_index, updates, excluded, sorted(self.sent), lambda k: client_ranks.client_rank(k, rank)
        )
        self.server.history.append({**self.server.last_round, "acc": float("nan")})
        self.save()
        metrics = {k: float(v) for k, v in self.server.last_round.items() if k != "round"}
        return ArrayRecord(encode_global(model, self.server.server_state)), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> list:
        return []  # the server holds the global model; plan validate evaluates it

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> None:
        return None

    def summary(self) -> None:
        from flwr.common.logger import log

        data = self.federation.data.data
        log(
            INFO,
            "plan: %d clients, %d per round, aggregation %r",
            data.num_clients,
            data.clients_per_round,
            self.server.rule.name,
        )

    # -- the loop, with resume ----------------------------------------------------------------------------

    def start_state(self) -> None:
        """The global state: the checkpoint's if there is one, else the seeded init every client starts from."""
        if self.checkpoint is not None and self.checkpoint.is_file():
            self.resume(torch.load(self.checkpoint, weights_only=False))
        else:
            self.server.start(self.federation.model)

    def run(self, grid: Any, num_rounds: int | None = None, wait: float = 120.0) -> FederationServer:
        """Rounds ``rounds_closed + 1 .. num_rounds`` (default: the config's ``data.rounds``)."""
        from flwr.app import ArrayRecord, ConfigRecord

        rounds = num_rounds or self.federation.data.data.rounds
        self.start_state()
        self.summary()
        self.connect(grid, wait)
        arrays = ArrayRecord(encode_global(self.federation.model, self.server.server_state))
        for server_round in range(self.server.rounds_closed + 1, rounds + 1):
            messages = self.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=self.timeout)
            arrays, _ = self.aggregate_train(server_round, replies)
        from flwr.common.logger import log

        log(
            INFO,
            "plan: federation over Flower, aggregation %r\n%s",
            self.server.rule.name,
            format_rounds(self.server.history),
        )
        return self.server

    # -- checkpoints --------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "federation": self.federation.settings(),
            "config": self.federation.config,
            "server": self.server.state_dict(),
            "stack": {
                name: (layer.past_A.cpu().clone(), layer.past_B.cpu().clone())
                for name, layer in self.federation.model.lora_layers.items()
            },
        }

    def save(self) -> None:
        """Write the server state atomically (a crash mid-write leaves the previous round's file)."""
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint.with_name(self.checkpoint.name + ".partial")
        torch.save(self.state(), partial)
        os.replace(partial, self.checkpoint)

    def resume(self, state: dict) -> None:
        """Continue from a saved state, refusing one of another federation (naming every differing value)."""
        where = str(self.checkpoint)
        require(
            isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT,
            f"{where} is not a plan Flower server checkpoint (format {CHECKPOINT_FORMAT!r})",
        )
        diff = settings_diff(state["federation"], self.federation.settings())
        stored_rule = state["server"]["rule"]
        if stored_rule != self.server.rule.name:
            diff.insert(0, f"aggregation: checkpoint {stored_rule!r}, this server {self.server.rule.name!r}")
        require(
            not diff,
            f"server checkpoint {where} belongs to another federation; (checkpoint, this server) differ in:\n  "
            + "\n  ".join(diff)
            + f"\nresume with the config it was written with ({state.get('config')}), or start afresh with another checkpoint path",
        )
        model = self.federation.model
        for name, (a, b) in state["stack"].items():
            model.lora_layers[name].past_A = a.to(model.lora_layers[name].past_A)
            model.lora_layers[name].past_B = b.to(model.lora_layers[name].past_B)
        self.server.load_state_dict(state["server"])
        load_state(model, self.server.server_state)


def settings_diff(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: checkpoint X, this run Y`` for every leaf where two nested settings dicts differ."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {_short(a)} != {_short(b)}")
    return lines


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_node_settings(server: dict, node: dict, node_id: int) -> int:
    """The node's client id, once its data, LoRA and backbone settings are the server's; else a ConfigError that
    names each differing value and the server's (the valid one)."""
    diff = [
        line
        for key in ("data", "lora", "backbone")
        for line in settings_diff({key: node.get(key)}, {key: server.get(key)})
    ]
    client = node.get("client")
    num_clients = server["data"]["num_clients"]
    if not isinstance(client, int) or not 0 <= client < num_clients:
        diff.append(f"{PARTITION_ID}: {client!r} is not a client id in 0..{num_clients - 1}")
    require(
        not diff,
        f"Flower node {node_id} (client {client}) does not match the server's federation; (node, server) differ in:\n  "
        + "\n  ".join(diff)
        + "\ngive the node the server's plan config (node config plan-config), or change the node's values to the server's",
    )
    assert isinstance(client, int)  # checked above
    return client


def server_app(config: str | None = None, checkpoint: str | Path | None = None, timeout: float = 600.0):
    """A Flower ``ServerApp`` for the plan federation in ``config`` (default: the run config's ``plan-config``);
    ``checkpoint`` (default: the run config's ``plan-checkpoint``) makes it resumable."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation = Federation.load(config or config_path(context))
        path = checkpoint or str(context.run_config.get("plan-checkpoint", "")) or None
        wait = float(context.run_config.get("plan-connect-timeout", 120.0))
        PlanStrategy(federation, path, float(context.run_config.get("plan-round-timeout", timeout))).run(
            grid, wait=wait
        )

    return app


def run_simulation(
    config: str | Path,
    checkpoint: str | Path | None = None,
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    timeout: float = 600.0,
) -> None:
    """Run the plan federation in ``config`` in Flower's simulation engine: one virtual SuperNode per client
    (``partition-id`` = client id), each ``ClientApp`` on a Ray worker with ``cpus_per_client`` CPUs."""
    from flwr.simulation import run_simulation as flower_simulation

    num_clients = _num_clients(str(config))
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    flower_simulation(
        server_app=server_app(str(config), checkpoint, timeout),
        client_app=client_app(str(config)),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}, "init_args": init_args},
    )


def _num_clients(config: str) -> int:
    import yaml

    data = (yaml.safe_load(Path(config).read_text()) or {}).get("data", {})
    return int((data.get("init_args") or {}).get("num_clients", 10))


def write_app(
    directory: str | Path,
    config: str | Path,
    checkpoint: str | Path | None = None,
    round_timeout: float = 600.0,
    connect_timeout: float = 120.0,
    clientapp: str = "plan.flower:client",
) -> Path:
    """Write the Flower App (a ``pyproject.toml``) that ``flwr run DIRECTORY`` submits to a SuperLink: plan's
    server and client apps, with the plan YAML and server checkpoint as absolute paths in its run config (every
    machine must hold the YAML, and its data source, at that path; a node may override it with its node config).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        PLAN_CONFIG: str(Path(config).resolve()),
        "plan-checkpoint": str(Path(checkpoint).resolve()) if checkpoint else "",
        "plan-round-timeout": float(round_timeout),
        "plan-connect-timeout": float(connect_timeout),
    }
    lines = [
        "[project]",
        'name = "plan-federation"',
        'version = "1.0.0"',
        'description = "A plan federated config over Flower"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "plan"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "plan.flower:server"',
        f"clientapp = {json.dumps(clientapp)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


# Components for `flwr run` (deployment engine): they read the plan YAML from the run or node config.
server = server_app()
client = client_app()


def main(argv: list[str] | None = None) -> None:
    """``python -m plan.flower simulate --config run.yaml [--checkpoint server.pt]`` runs the federation in
    Flower's simulation engine; ``python -m plan.flower app --config run.yaml --out DIR`` writes the Flower App
    that ``flwr run DIR`` submits to a SuperLink (deployment engine; see the README)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m plan.flower", description=main.__doc__)
    parser.add_argument("command", choices=["simulate", "app"])
    parser.add_argument("--config", required=True, help="a federated plan YAML (configs/federated/*.yaml)")
    parser.add_argument("--checkpoint", default=None, help="server state file: written every round, resumed from")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    parser.add_argument("--num-cpus", type=int, default=None, help="simulate: CPUs Ray may use (default: all)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="simulate: CPUs per ClientApp worker")
    parser.add_argument("--out", default="flower-app", help="app: the directory to write the Flower App to")
    args = parser.parse_args(argv)
    if args.command == "app":
        print(write_app(args.out, args.config, args.checkpoint, args.round_timeout))
    else:
        run_simulation(args.config, args.checkpoint, args.num_cpus, args.cpus_per_client, args.round_timeout)


if __name__ == "__main__":  # the apps' functions must come from plan.flower, which Ray's workers can import
    from plan.flower import main as flower_main

    flower_main()
