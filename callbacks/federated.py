"""The federated round driver: one epoch is one communication round of simulated clients.

One model lives on each device. Each sampled client in turn gets the global adapters and head loaded into the
model's LoRA slots (the same ``Parameter`` objects all run), trains with a fresh optimizer state, and leaves a
copy of its factors on the CPU; at the round end the copies are screened for faults, gathered from every rank,
and combined by a rule from :mod:`plan.aggregation`. Memory therefore grows by one adapter per client, never by
one model.

The two sides of a round are classes of their own, :class:`ClientTraining` (a client's start, step seeds and
upload) and :class:`FederationServer` (screening, aggregation, the FLoRA merge, the client store), so that a
real federation over Flower (:mod:`plan.flower`) runs the very same code in separate processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from plan.aggregation import (
    AggregationRule,
    ClientUpdate,
    GlobalState,
    agreement,
    make_rule,
    screen_updates,
)
from plan.callbacks.sequencer import bind_epochs_to_stages, run_seed
from plan.datamodules.federated import IDLE_CLIENT
from plan.seeding import reseed, step_seed

DROPOUT_STREAM, REINIT_STREAM, STEP_STREAM = 1, 2, 3  # what a seed drawn for (round, client) is for
DROPPED = "dropped out (no reply)"


def local_step_seed(seed: int, round_index: int, client: int, local_step: int) -> int:
    """The seed of a client's ``local_step``-th step in a round: the same on any rank, process or machine, and
    whether or not the run was resumed in between."""
    return step_seed(seed, round_index, client, STEP_STREAM, local_step)


# -- model <-> server state ---------------------------------------------------------------------------------


def read_slots(pl_module: pl.LightningModule) -> dict[str, tuple[Tensor, Tensor]]:
    """Every LoRA slot's ``(A, B)``, copied to the CPU."""
    return {
        name: (layer.lora_A.detach().cpu().clone(), layer.lora_B.detach().cpu().clone())
        for name, layer in pl_module.lora_layers.items()
    }


def read_head(pl_module: pl.LightningModule) -> dict[str, Tensor]:
    return {name: p.detach().cpu().clone() for name, p in pl_module.head_parameters().items()}


@torch.no_grad()
def load_state(pl_module: pl.LightningModule, state: GlobalState) -> None:
    """Copy the global adapters and head into the model (in place: the parameters keep their identity)."""
    for name, layer in pl_module.lora_layers.items():
        a, b = state.adapters[name]
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        layer.active_rank, layer.scale = layer.rank, pl_module.lora_config.scale
    for name, p in pl_module.head_parameters().items():
        p.copy_(state.head[name])


# -- the client's side of a round ---------------------------------------------------------------------------


class ClientTraining:
    """A client's part of a round, whether it is simulated inside one ``fit`` or a real Flower client.

    A client of rank ``r_k`` starts from the first ``r_k`` components of the global adapter at its own scale
    with its optimizer state cleared, and uploads its factors read at the run's scale, so that the server sees
    every update as the weight change it makes.

    Args:
        client_ranks, client_scale: as :class:`FederatedRounds`.
    """

    def __init__(self, client_ranks: list[int] | None = None, client_scale: str = "run") -> None:
        if client_scale not in ("run", "rank"):
            raise ValueError(f"client_scale must be 'run' or 'rank', got {client_scale!r}")
        self.client_ranks, self.client_scale = client_ranks, client_scale

    def client_rank(self, client: int, default: int) -> int:
        return self.client_ranks[client % len(self.client_ranks)] if self.client_ranks else default

    def scale_ratio(self, client: int, rank: int) -> float:
        """``s_k / s``: the client's LoRA scale over the run's (1 unless ``client_scale='rank'``)."""
        return rank / self.client_rank(client, rank) if self.client_scale == "rank" else 1.0

    def start(
        self,
        pl_module: pl.LightningModule,
        optimizers: Iterable[torch.optim.Optimizer],
        state: GlobalState,
        client: int,
    ) -> None:
        """Load the global state into the model at the client's rank and scale; clear the optimizer state."""
        load_state(pl_module, state)
        self.set_active_rank(pl_module, client)
        ratio = self.scale_ratio(client, pl_module.lora_config.rank)
        with torch.no_grad():  # the client starts from the global weight change: s_k B_k = s B
            for layer in pl_module.lora_layers.values():
                layer.lora_B.div_(ratio)
        for optimizer in optimizers:
            optimizer.state.clear()

    def set_active_rank(self, pl_module: pl.LightningModule, client: int) -> None:
        """The client's rank and LoRA scale on every layer."""
        config = pl_module.lora_config
        rank, scale = self.client_rank(client, config.rank), config.scale * self.scale_ratio(client, config.rank)
        for layer in pl_module.lora_layers.values():
            layer.active_rank, layer.scale = rank, scale

    def finish(self, pl_module: pl.LightningModule, client: int, num_samples: int) -> ClientUpdate:
        """The client's upload: its first ``r_k`` components, in the run's scale (``s B = s_k B_k``)."""
        rank = self.client_rank(client, pl_module.lora_config.rank)
        ratio = self.scale_ratio(client, pl_module.lora_config.rank)
        adapters = {name: (a[:rank], b[:, :rank] * ratio) for name, (a, b) in read_slots(pl_module).items()}
        return ClientUpdate(client, num_samples, adapters, read_head(pl_module))


# -- the server's side of a round ---------------------------------------------------------------------------


class FederationServer:
    """The server's part of the rounds, whether they are simulated inside one ``fit`` or run over Flower.

    It holds the global adapters and head, every client's last aggregated upload, the rounds closed and their
    history. At a round end it screens the replies for faults, aggregates the rest by the rule, merges what the
    rule merges into the global model's frozen stack, and redraws the slot when the rule says so; the global
    model (any module with ``lora_layers``, ``lora_config`` and ``head_parameters``) then holds the new state.

    Args:
        rule, dropout_prob, norm_ratio, seed: as :class:`FederatedRounds`.
    """

    def __init__(
        self,
        rule: str | AggregationRule = "fedit",
        dropout_prob: float = 0.0,
        norm_ratio: float = 10.0,
        seed: int | None = None,
    ) -> None:
        if not 0 <= dropout_prob < 1:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        if norm_ratio <= 1:
            raise ValueError(f"norm_ratio must be > 1, got {norm_ratio}")
        self.rule = make_rule(rule)
        self.dropout_prob, self.norm_ratio, self.seed = dropout_prob, norm_ratio, seed
        self.global_state: GlobalState | None = None
        self.clients: dict[int, ClientUpdate] = {}  # each client's last aggregated upload, on the CPU
        self.rounds_closed = 0
        self.last_round: dict = {}
        self.history: list[dict] = []  # one row per closed round: its last_round and the global accuracy

    @property
    def server_state(self) -> GlobalState:
        """The global adapters and head: set at the start, or by a checkpoint."""
        if self.global_state is None:
            raise RuntimeError("the federation has no global state before its start or a checkpoint load")
        return self.global_state

    def _seed(self, round_index: int, client: int, *keys: int) -> int:
        assert self.seed is not None  # set before the first round
        return step_seed(self.seed, round_index, client, *keys)

    def start(self, pl_module: pl.LightningModule) -> None:
        """A fresh federation: every client starts from one seeded init of the slots and the model's head."""
        assert self.seed is not None  # set before the first round
        generator = torch.Generator().manual_seed(self.seed * 7 + 1)
        for layer in pl_module.lora_layers.values():
            layer.reset_slot(generator)
        self.global_state = GlobalState(read_slots(pl_module), read_head(pl_module))

    def drops(self, round_index: int, client: int) -> bool:
        """Whether the simulated fault ``dropout_prob`` makes ``client`` never reply in the round (seeded)."""
        rng = np.random.default_rng(self._seed(round_index, client, DROPOUT_STREAM))
        return bool(rng.random() < self.dropout_prob)

    def close_round(
        self,
        pl_module: pl.LightningModule,
        round_index: int,
        replies: list[ClientUpdate],
        excluded: dict[int, str],
        sampled: list[int],
        client_rank: Callable[[int], int],
    ) -> None:
        """Screen ``replies`` (sorted by client), aggregate what is left, and leave the new global state in the
        model and in :attr:`global_state`; ``excluded`` names the sampled clients that did not reply and why."""
        kept, faulty = screen_updates(replies, self.server_state, self.norm_ratio)
        excluded = {**faulty, **excluded}
        self.clients.update({u.client: u for u in kept})
        for client, reason in sorted(excluded.items()):
            rank_zero_warn(f"round {round_index}: client {client} excluded: {reason}")
        start, scale = self.server_state, pl_module.lora_config.scale
        cosine = error = float("nan")
        if kept:
            state = self.rule.aggregate(kept, start, scale, pl_module.lora_config.rank)
            cosine, error = agreement(kept, state, scale)
        else:
            rank_zero_warn(
                f"round {round_index}: every client failed ({len(excluded)} excluded); the global adapters stay as they were"
            )
            state = GlobalState(start.adapters, start.head)  # nothing to merge again, no re-initialisation
        for name, (a, b) in state.merged.items():
            pl_module.lora_layers[name].absorb(a, b)
        if state.reinit:
            generator = torch.Generator().manual_seed(self._seed(round_index + 1, 0, REINIT_STREAM))
            for layer in pl_module.lora_layers.values():
                layer.reset_slot(generator)
            state.adapters = read_slots(pl_module)
        load_state(pl_module, state)
        element = pl_module.slot_parameters()[0].element_size()
        self.last_round = {
            "round": round_index,
            "clients": len(sampled),
            "aggregated": len(kept),
            "excluded": len(excluded),
            "bytes_down": element
            * sum(self.rule.download_numel(start, client_rank(k), round_index == 0) for k in sampled),
            "bytes_up": element * sum(self.rule.upload_numel(u) for u in replies),
            "cosine_to_ideal": cosine,
            "error_to_ideal": error,
        }
        self.global_state = state
        self.rounds_closed = round_index + 1

    def state_dict(self) -> dict:
        return {
            "rule": self.rule.name,
            "seed": self.seed,
            "rounds_closed": self.rounds_closed,
            "global": _state_to_dict(self.server_state),
            "clients": {k: _update_to_dict(u) for k, u in self.clients.items()},
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["rule"] != self.rule.name:
            raise ValueError(
                f"checkpoint was aggregated with {state_dict['rule']!r}, this run asks for {self.rule.name!r}"
            )
        self.seed, self.rounds_closed = state_dict["seed"], state_dict["rounds_closed"]
        self.global_state = _state_from_dict(state_dict["global"])
        self.clients = {int(k): _update_from_dict(v) for k, v in state_dict["clients"].items()}
        self.history = state_dict["history"]


# -- the round driver ---------------------------------------------------------------------------------------


class FederatedRounds(Callback):
    """Drives ``plan.datamodules.FederatedDataModule``'s rounds: client switches, faults and aggregation.

    Args:
        aggregation: the rule: ``fedit``, ``ffa_lora``, ``lora_fair``, ``flexlora``, ``flora``, or a
            :class:`plan.aggregation.AggregationRule` (e.g. ``LoRAFAIR(lam=0.01, steps=1000)``).
        client_ranks: LoRA rank per client, assigned cyclically (client ``k`` gets ``client_ranks[k % len]``);
            each at most the model's ``lora.rank``. Default: every client uses the model's rank.
        client_scale: the LoRA scale a client of rank ``r_k`` trains with: ``run`` (the run's ``alpha / rank``,
            so ranks differ only in how many components train) or ``rank`` (``alpha / r_k``, FlexLoRA's official
            code). Either way the server sees every update as the weight change it makes (``s_k B_k A_k``), so
            the rules aggregate the same quantity; only the clients' training dynamics differ.
        train_A: whether clients train the down-projection ``A``; default: the rule's choice (FFA-LoRA: no).
        dropout_prob: chance that a sampled client never replies (seeded per round and client).
        norm_ratio: an update whose norm exceeds this multiple of the round's median is excluded.
        seed: seeds the shared adapter init, client dropout and each client's RNG; default: the run's seed.
    """

    def __init__(
        self,
        aggregation: str | AggregationRule = "fedit",
        client_ranks: list[int] | None = None,
        client_scale: str = "run",
        train_A: bool | None = None,
        dropout_prob: float = 0.0,
        norm_ratio: float = 10.0,
        seed: int | None = None,
    ) -> None:
        rule = make_rule(aggregation)
        if train_A and not rule.trains_A:
            raise ValueError(
                f"aggregation {rule.name!r} keeps A frozen at its shared init (that is what makes it exact); "
                "train_A=True contradicts it: drop train_A or choose a rule that trains A (fedit, lora_fair, flexlora, flora)"
            )
        self.client = ClientTraining(client_ranks, client_scale)  # the settings live once, in the two sides
        self.server = FederationServer(rule, dropout_prob, norm_ratio, seed)
        self.train_A = rule.trains_A if train_A is None else train_A
        self.round_updates: list[ClientUpdate] = []
        self.current_client: int | None = None
        self.client_first_batch = 0  # the round's batch index at which the current client started

    # -- setup --------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.server.seed = run_seed(self.server.seed)
        if stage != "fit":
            return
        bind_epochs_to_stages(trainer, self, "sampled_clients", "round", "plan.datamodules.FederatedDataModule")
        check_client_ranks(self.server.rule, self.client.client_ranks, pl_module.lora_config.rank)
        for layer in pl_module.lora_layers.values():
            layer.lora_A.requires_grad_(self.train_A)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.server.global_state is None:  # a fresh run: every client starts from one seeded init
            self.server.start(pl_module)
            self._log_partition(trainer)
        elif self.current_client is None:
            load_state(pl_module, self.server.server_state)
        else:  # resumed in the middle of a client's local training: the model holds that client's progress
            self.client.set_active_rank(pl_module, self.current_client)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Ranks train different clients: DDP must not average their gradients or broadcast buffers during
        # local training. The round-end gather is the only exchange (the datamodule keeps the ranks' step
        # counts equal, since Lightning also synchronises every step).
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False
            model.require_forward_param_sync = False

    # -- client switches ----------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.round_updates, self.current_client = [], None
        rank_zero_info(f"plan: {trainer.datamodule.describe_stage(trainer.current_epoch)}")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        client = int(batch["client"][0])
        if client != self.current_client:
            if self.current_client is not None:
                self._finish_client(trainer, pl_module)
            if client != IDLE_CLIENT:  # an idle step trains a leftover copy that the round end overwrites
                self._start_client(trainer, pl_module, client, batch_idx)
        # A client's k-th local step draws from (seed, round, client, k), whichever rank it runs on and
        # whether or not the run was resumed in between.
        assert self.server.seed is not None  # set at setup
        reseed(local_step_seed(self.server.seed, trainer.current_epoch, client, batch_idx - self.client_first_batch))

    def _start_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule, client: int, batch_idx: int) -> None:
        self.current_client, self.client_first_batch = client, batch_idx
        self.client.start(pl_module, trainer.optimizers, self.server.server_state, client)

    def _finish_client(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        client = self.current_client
        assert client is not None  # called only while a client trains
        update = self.client.finish(pl_module, client, trainer.datamodule.client_sizes[client])
        self.round_updates.append(update)
        self.current_client = None

    # -- the round end ------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._close_round(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_round(trainer, pl_module)  # already done if the round was validated
        self._log_round(trainer)

    def _close_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        round_index = trainer.current_epoch
        if self.server.rounds_closed > round_index:
            return
        if self.current_client is not None:
            self._finish_client(trainer, pl_module)
        replies, dropped = [], {}
        for update in self.round_updates:
            if self.server.drops(round_index, update.client):
                dropped[update.client] = DROPPED
            else:
                replies.append(update)
        parts = _from_every_rank((replies, dropped), trainer)  # one collective; sorted so every rank agrees
        replies = sorted((u for rank_replies, _ in parts for u in rank_replies), key=lambda u: u.client)
        dropped = {k: reason for _, rank_dropped in parts for k, reason in rank_dropped.items()}
        rank = pl_module.lora_config.rank
        self.server.close_round(
            pl_module,
            round_index,
            replies,
            dropped,
            trainer.datamodule.sampled_clients(round_index),
            lambda k: self.client.client_rank(k, rank),
        )

    # -- logging ------------------------------------------------------------------------------------------

    def _log_round(self, trainer: pl.Trainer) -> None:
        last_round = self.server.last_round
        if not last_round:
            return
        accuracy = trainer.callback_metrics.get("val/acc")
        self.server.history.append({**last_round, "acc": float("nan") if accuracy is None else float(accuracy)})
        if not trainer.is_global_zero:
            return
        metrics = {
            f"fed/{k}": float(v) for k, v in self.server.history[-1].items() if k != "round" and not math.isnan(v)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=last_round["round"] + 1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"federated run, aggregation {self.server.rule.name!r}\n{format_rounds(self.server.history)}")

    def _log_partition(self, trainer: pl.Trainer) -> None:
        """Per-client label histograms: a heatmap and a table in TensorBoard, sizes in the console."""
        histogram = trainer.datamodule.label_histogram()
        sizes = histogram.sum(1).tolist()
        rank_zero_info(
            f"{len(sizes)} clients, {trainer.datamodule.clients_per_round} per round, aggregation {self.server.rule.name!r}; "
            f"client sizes min {min(sizes)} / median {sorted(sizes)[len(sizes) // 2]} / max {max(sizes)}"
        )
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("fed/label_histogram", histogram_figure(histogram), global_step=0)
                rows = [
                    "| client | n | " + " | ".join(f"c{c}" for c in range(histogram.shape[1])) + " |",
                    "|---" * (histogram.shape[1] + 2) + "|",
                ]
                rows += [
                    f"| {k} | {sizes[k]} | " + " | ".join(map(str, row)) + " |"
                    for k, row in enumerate(histogram.tolist())
                ]
                logger.experiment.add_text("fed/label_histogram_table", "\n".join(rows), global_step=0)

    # -- checkpoints --------------------------------------------------------------------------------------

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            found = sorted(checkpoint.get("callbacks", {}))
            raise ValueError(
                f"checkpoint was not written by a federated run (its callbacks: {found}); resume it with the scenario that wrote it"
            )

    def state_dict(self) -> dict:
        return {
            **self.server.state_dict(),
            # the round so far, for a checkpoint taken in the middle of it
            "round_updates": [_update_to_dict(u) for u in self.round_updates],
            "current_client": self.current_client,
            "client_first_batch": self.client_first_batch,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.server.load_state_dict(state_dict)
        self.round_updates = [_update_from_dict(u) for u in state_dict["round_updates"]]
        self.current_client, self.client_first_batch = state_dict["current_client"], state_dict["client_first_batch"]


def check_client_ranks(rule: AggregationRule, client_ranks: list[int] | None, rank: int) -> None:
    """Refuse client ranks the model's LoRA rank cannot hold, or unequal ranks under a rule that needs one."""
    ranks = client_ranks or [rank]
    bad = [r for r in ranks if not 1 <= r <= rank]
    if bad:
        raise ValueError(
            f"client_ranks {bad} do not fit the model's LoRA rank {rank}: each must be in 1..{rank} (raise lora.rank)"
        )
    if rule.equal_ranks and len(set(ranks)) > 1:
        raise ValueError(
            f"aggregation {rule.name!r} needs every client at one rank, but client_ranks={ranks} differ; "
            f"use equal ranks or a rule for heterogeneous ranks ('flexlora', 'flora')"
        )


def format_rounds(history: list[dict]) -> str:
    """The run's rounds as a table: global accuracy, clients aggregated and excluded, traffic; then totals."""
    lines = [f"{'round':>5} {'acc':>7} {'aggregated':>10} {'excluded':>8} {'MB up':>9} {'MB down':>9}"]
    for row in history:
        lines.append(
            f"{row['round']:>5} {row['acc']:>7.4f} {row['aggregated']:>10} {row['excluded']:>8} "
            f"{row['bytes_up'] / 1e6:>9.3f} {row['bytes_down'] / 1e6:>9.3f}"
        )
    if history:
        total = lambda key: sum(row[key] for row in history)
        lines.append(
            f"{'all':>5} {history[-1]['acc']:>7.4f} {total('aggregated'):>10} {total('excluded'):>8} "
            f"{total('bytes_up') / 1e6:>9.3f} {total('bytes_down') / 1e6:>9.3f}"
        )
    return "\n".join(lines)


def _from_every_rank(obj, trainer: pl.Trainer) -> list:
    """``obj`` as every rank has it (``[obj]`` in a single process)."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]


def _update_to_dict(update: ClientUpdate) -> dict:
    return {
        "client": update.client,
        "num_samples": update.num_samples,
        "adapters": update.adapters,
        "head": update.head,
    }


def _update_from_dict(d: dict) -> ClientUpdate:
    return ClientUpdate(d["client"], d["num_samples"], {k: tuple(v) for k, v in d["adapters"].items()}, d["head"])


def _state_to_dict(state: GlobalState) -> dict:
    return {"adapters": state.adapters, "head": state.head, "merged": state.merged}


def _state_from_dict(d: dict) -> GlobalState:
    pairs = lambda m: {k: tuple(v) for k, v in m.items()}
    return GlobalState(pairs(d["adapters"]), d["head"], pairs(d["merged"]))


def histogram_figure(histogram: Tensor):
    """Clients (rows) by classes (columns), colour = how many examples of the class the client holds."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    clients, classes = histogram.shape
    figure = Figure(figsize=(1.5 + 0.3 * classes, 1.0 + 0.25 * min(clients, 100)))
    axes = figure.subplots()
    image = axes.imshow(histogram.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("class")
    axes.set_ylabel("client")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.colorbar(image, ax=axes, fraction=0.046, label="examples")
    figure.tight_layout()
    return figure
