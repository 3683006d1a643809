"""Federated client streams: one training epoch is one communication round.

The datamodule partitions a source's training split among ``num_clients`` clients (seeded), samples the
round's clients (seeded per round), and streams each sampled client's local batches in turn, every batch tagged
with its client id; :class:`plan.callbacks.FederatedRounds` turns the tags into client switches. Under DDP the
round's clients are sharded across ranks, balanced by step count, each client wholly on one rank with its
full local batch; lighter ranks pad with idle one-example steps because Lightning synchronises ranks at every
training step. Validation measures the global model on the
whole test split (one dataloader, sharded across ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from plan.datamodules.continual import (
    PREDICT_SPLITS,
    Predictions,
    ResumableLoader,
    TaskLayout,
    check_loader_settings,
    eval_batches,
    free_text_tasks,
    hold_out,
    load_splits,
    tokenizer_for,
    tokenizer_name_for,
)
from plan.datamodules.encoding import (
    EncodedExamples,
    InstructionExamples,
    InstructionFormat,
    encode_split,
    instruction_format_for,
)
from plan.datamodules.sources import DataSource, Examples
from plan.errors import require
from plan.partition import label_histogram, partition


class ClientTagged(Dataset):
    """Examples indexed by ``(client, i)``: the item of example ``i`` with its client id added."""

    def __init__(self, examples: EncodedExamples | InstructionExamples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        client, i = key
        return {**self.examples[i], "client": client}


IDLE_CLIENT = -1  # the client id of an idle step: one example that pads a rank to the busiest rank's step count


def client_steps(size: int, batch_size: int, local_epochs: int, local_steps: int | None) -> int:
    """Local batches of a client holding ``size`` examples."""
    return local_steps if local_steps is not None else local_epochs * -(-size // batch_size)


def balance_clients(clients: list[int], steps: list[int], world_size: int) -> list[list[int]]:
    """Clients per rank, longest first onto the least-loaded rank (ties: lower rank), each rank's list sorted.
    Depends only on its inputs, so every rank computes the same assignment."""
    loads = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for client in sorted(clients, key=lambda c: (-steps[c], c)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        ranks[rank].append(client)
        loads[rank] += steps[client]
    return [sorted(r) for r in ranks]


class ClientRoundSampler(Sampler[list[tuple[int, int]]]):
    """Each of ``clients`` in turn: ``local_epochs`` seeded passes over its examples, or exactly ``local_steps``
    batches (passes repeat as needed), then ``idle_steps`` one-example batches tagged :data:`IDLE_CLIENT`.
    Client ``k``'s order in round ``t`` depends only on ``(seed, t, k)``, so it is the same on every rank."""

    def __init__(
        self,
        clients: list[int],
        client_indices: list[list[int]],
        batch_size: int,
        seed: int,
        round_index: int,
        local_epochs: int = 1,
        local_steps: int | None = None,
        idle_steps: int = 0,
    ) -> None:
        self.clients, self.client_indices, self.batch_size = clients, client_indices, batch_size
        self.seed, self.round_index, self.local_epochs, self.local_steps = seed, round_index, local_epochs, local_steps
        self.idle_steps = idle_steps

    def client_batches(self, client: int) -> list[list[int]]:
        indices = self.client_indices[client]
        rng = np.random.default_rng([self.seed, self.round_index, client])
        batches: list[list[int]] = []
        wanted = client_steps(len(indices), self.batch_size, self.local_epochs, self.local_steps)
        while len(batches) < wanted:
            order = [indices[i] for i in rng.permutation(len(indices))]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches[:wanted]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for client in self.clients:
            for batch in self.client_batches(client):
                yield [(client, i) for i in batch]
        for _ in range(self.idle_steps):
            yield [(IDLE_CLIENT, 0)]

    def __len__(self) -> int:
        sizes = [len(self.client_indices[c]) for c in self.clients]
        return (
            sum(client_steps(n, self.batch_size, self.local_epochs, self.local_steps) for n in sizes) + self.idle_steps
        )


class FederatedDataModule(Predictions, pl.LightningDataModule):
    """``num_clients`` simulated clients over one source; epoch ``t`` is round ``t``.

    Args:
        source: the labelled data (20 Newsgroups, a ``datasets`` dataset, synthetic data).
        rounds: communication rounds (the trainer's epochs).
        num_clients: clients the training split is partitioned into; 1 gives centralised training.
        partition: ``iid``, ``dirichlet`` (over labels, ``alpha``), ``shards`` (``shards_per_client`` label
            shards each) or ``domain`` (one domain per client, as LoRA-FAIR's feature non-IID; with ``alpha``
            set, also a Dirichlet label split inside each domain).
        alpha: Dirichlet concentration; small is skewed (0.1), large approaches IID.
        min_client_size: the fewest training examples a client may hold; a partition that leaves fewer fails.
        clients_per_round, client_fraction: how many clients each round samples (the count wins if given).
        local_epochs, local_steps: a sampled client's local training: passes over its data, or a fixed number
            of batches (the count wins if given).
        batch_size: a client's local batch size (never split across ranks).
        seed: seeds the partition, the per-round client sample and every client's data order.
        tokenizer, max_length: how text is encoded.
        val_fraction: hold out this seeded share of the training split, before the partition, as the server's
            validation set (validation, and ``fed/acc``, read it; ``plan test`` reads the test split).
        predict_split, predict_file: what ``plan predict`` predicts for (see TaskSequenceDataModule).
        instructions: how examples become instructions for a language model (see TaskSequenceDataModule).
    """

    def __init__(
        self,
        source: DataSource,
        rounds: int = 10,
        num_clients: int = 10,
        partition: str = "dirichlet",
        alpha: float | None = 0.5,
        shards_per_client: int = 2,
        min_client_size: int = 2,
        clients_per_round: int | None = None,
        client_fraction: float = 1.0,
        local_epochs: int = 1,
        local_steps: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        max_length: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        predict_split: str = "test",
        predict_file: str | None = None,
        instructions: InstructionFormat | None = None,
    ) -> None:
        super().__init__()
        require(
            predict_split in PREDICT_SPLITS,
            f"data.predict_split must be one of {PREDICT_SPLITS}, got {predict_split!r}",
        )
        require(rounds >= 1, f"rounds must be >= 1, got {rounds}")
        require(0 < client_fraction <= 1, f"client_fraction must be in (0, 1], got {client_fraction}")
        require(
            clients_per_round is None or 1 <= clients_per_round <= num_clients,
            f"clients_per_round must be in 1..num_clients={num_clients}, got {clients_per_round}",
        )
        require(
            local_epochs >= 1 and (local_steps is None or local_steps >= 1),
            f"local_epochs and local_steps must be >= 1, got {local_epochs} and {local_steps}",
        )
        check_loader_settings(batch_size, eval_batch_size, max_length, num_workers)
        self.source = source
        self.rounds = rounds
        self.num_clients = num_clients
        self.partition = partition
        self.alpha = alpha
        self.shards_per_client = shards_per_client
        self.min_client_size = min_client_size
        self.clients_per_round = clients_per_round or max(1, round(client_fraction * num_clients))
        self.local_epochs, self.local_steps = local_epochs, local_steps
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.tokenizer_name, self.max_length, self.num_workers = tokenizer, max_length, num_workers
        self.predict_split, self.predict_file = predict_split, predict_file
        require(0.0 <= val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.instructions = instructions
        self.instruction_format: InstructionFormat | None = None  # set at setup: instructions, for a language model
        self.tokenizer: Any = None  # set at setup: the tokenizer of tokenizer_name (None for images)
        self.joint = True  # the module trains and evaluates on every class at once
        self.layout: TaskLayout | None = None
        self.client_indices: list[list[int]] = []
        self.pad_id = 0
        self._train: EncodedExamples | InstructionExamples | None = None
        self._test: EncodedExamples | InstructionExamples | None = None
        self._val: EncodedExamples | InstructionExamples | None = None  # held out of training, or the test split

    # -- the federation -----------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return self.rounds

    @property
    def client_sizes(self) -> list[int]:
        return [len(indices) for indices in self.client_indices]

    def sampled_clients(self, round_index: int) -> list[int]:
        """The round's clients, sorted: a seeded draw without replacement that depends only on (seed, round)."""
        rng = np.random.default_rng([self.seed, round_index, 7])
        return sorted(int(c) for c in rng.choice(self.num_clients, self.clients_per_round, replace=False))

    def client_steps(self, client: int) -> int:
        return client_steps(len(self.client_indices[client]), self.batch_size, self.local_epochs, self.local_steps)

    def rank_schedule(self, round_index: int) -> tuple[list[int], int]:
        """This rank's clients in the round and the idle steps that pad it to the busiest rank.

        Lightning synchronises DDP ranks at every training step, so every rank must take as many steps as the
        busiest one; clients are balanced by step count (longest first) to keep the padding small."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        steps = [self.client_steps(k) for k in range(self.num_clients)]
        shares = balance_clients(self.sampled_clients(round_index), steps, world)
        loads = [sum(steps[k] for k in share) for share in shares]
        return shares[rank], max(loads) - loads[rank]

    def label_histogram(self) -> Tensor:
        """``H[k, c]``: examples of class ``c`` held by client ``k``."""
        assert self._train is not None and self.layout is not None  # set at setup
        return label_histogram(self._train.labels.tolist(), self.client_indices, self.layout.num_classes)

    def seen_now(self) -> int:
        return 1

    def stage_name(self, stage: int) -> str:
        return f"round {stage + 1}/{self.rounds}"

    def describe_stage(self, stage: int) -> str:
        return f"round {stage + 1} of {self.rounds}: clients {self.sampled_clients(stage)}"

    def fingerprint(self) -> dict:
        assert self.layout is not None  # set at setup, which Lightning runs before any checkpoint hook
        return {
            "scenario": "federated",
            "partition": self.partition,
            "alpha": self.alpha if self.partition in ("dirichlet", "domain") else None,
            "num_clients": self.num_clients,
            "client_sizes": self.client_sizes,
            "seed": self.seed,
            "classes": self.layout.class_names,
            "source": self.source.describe(),
        }

    # -- Lightning hooks ----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.layout is not None:
            return
        train, test = load_splits(self.source)
        classes = sorted(set(train.labels))
        class_id = {name: i for i, name in enumerate(classes)}
        self.layout = TaskLayout("federated", classes, [list(range(len(classes)))], ["global"])
        held = None
        if self.val_fraction:  # the server's own validation set, held out before the clients get their data
            (kept,), (held,) = hold_out([list(range(len(train)))], self.val_fraction, self.seed)
            train, held = train.subset(kept), train.subset(held)
        self.client_indices = partition(
            self.partition,
            [class_id[label] for label in train.labels],
            self.num_clients,
            self.seed,
            alpha=self.alpha,
            shards_per_client=self.shards_per_client,
            domains=train.domains,
            min_size=self.min_client_size,
        )
        self.tokenizer_name = tokenizer_name_for(self.tokenizer_name, self.trainer)
        self.tokenizer, self.pad_id = tokenizer_for(train, self.tokenizer_name, self.max_length)
        self.instruction_format = instruction_format_for(self.instructions, self.trainer)
        self._train = self._encode(train, "train")
        self._test = self._encode(test, "test")
        self._val = self._test if held is None else self._encode(held, "validation")
        if self.instruction_format is not None:
            self.layout.metrics = self.instruction_format.task_metrics(free_text_tasks(train, self.layout))

    def _encode(self, examples: Examples, split: str) -> EncodedExamples | InstructionExamples:
        """Encode a split: one task holds every class (the options an instruction lists)."""
        assert self.layout is not None  # set at setup, before encoding
        tasks = [0] * len(examples)
        return encode_split(
            examples,
            self.layout.class_names,
            tasks,
            self.layout.task_classes,
            self.source,
            self.instruction_format,
            self.tokenizer,
            self.max_length,
            split,
        )

    def train_dataloader(self) -> DataLoader:
        round_index = self.trainer.current_epoch if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        if self.clients_per_round < world:
            raise ValueError(
                f"{self.clients_per_round} clients per round cannot keep {world} ranks busy; sample at least {world}"
            )
        clients, idle_steps = self.rank_schedule(round_index)
        sampler = ClientRoundSampler(
            clients,
            self.client_indices,
            self.batch_size,
            self.seed,
            round_index,
            self.local_epochs,
            self.local_steps,
            idle_steps,
        )
        return ResumableLoader(
            ClientTagged(self._train),
            sampler,
            self.trainer,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self._val)]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self._test)]

    def predict_dataloader(self) -> DataLoader:
        split = self._train if self.predict_split == "train" else self._test
        return self._prediction_loader(split if self.predict_file is None else None)

    def _eval_loader(self, examples: EncodedExamples | InstructionExamples) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        batches = eval_batches(list(range(len(examples))), self.eval_batch_size, rank, world)
        return DataLoader(examples, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.num_workers)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict) -> None:
        stored, current = state_dict.get("fingerprint") or {}, self.fingerprint()
        if stored != current:
            diff = "; ".join(
                f"{k}: {stored.get(k)!r} != {current[k]!r}" for k in current if stored.get(k) != current[k]
            )
            raise ValueError(f"checkpoint belongs to a different federation; (checkpoint, this run) differ in: {diff}")
