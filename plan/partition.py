"""Client partitions for federated simulation: IID, Dirichlet over labels, label shards, and by domain.

Every partitioner is a pure, seeded function from per-example labels (or domains) to one list of example
indices per client, so a run's clients are the same on every rank, node and resume. Each client gets at least
``min_size`` examples or the call fails with a message that says what to change; no client is ever empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from plan.errors import ConfigError, require

PARTITIONS = ("iid", "dirichlet", "shards", "domain")


def _check_counts(num_examples: int, num_clients: int, min_size: int) -> None:
    require(num_clients >= 1, f"num_clients must be >= 1, got {num_clients}")
    require(min_size >= 1, f"min_client_size must be >= 1 (no client may be empty), got {min_size}")
    if num_clients * min_size > num_examples:
        raise ConfigError(
            f"{num_clients} clients with at least {min_size} example(s) each need {num_clients * min_size} examples, "
            f"but the training split has {num_examples}; use at most {num_examples // min_size} clients"
        )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def iid_partition(num_examples: int, num_clients: int, seed: int, min_size: int = 1) -> list[list[int]]:
    """A seeded shuffle cut into ``num_clients`` nearly equal parts (sizes differ by at most one)."""
    _check_counts(num_examples, num_clients, min_size)
    order = _rng(seed).permutation(num_examples).tolist()
    return [sorted(order[c::num_clients]) for c in range(num_clients)]


def _classes(labels: Sequence) -> tuple[list, dict]:
    classes = sorted(set(labels), key=str)
    members: dict = {c: [] for c in classes}
    for i, label in enumerate(labels):
        members[label].append(i)
    return classes, members


def dirichlet_partition(
    labels: Sequence, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[list[int]]:
    """Per class c, proportions ``q_c ~ Dir(alpha * 1)`` over clients cut c's shuffled examples (the
    Yurochkin et al. 2019 split that FedIT, FS-LLM and Flower use). Small ``alpha`` concentrates each class on
    few clients; large ``alpha`` approaches IID. Draws again until every client has ``min_size`` examples."""
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0 (small = skewed, large = near IID), got {alpha}")
    _check_counts(len(labels), num_clients, min_size)
    classes, members = _classes(labels)
    rng = _rng(seed)
    for _ in range(max_tries):
        clients: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = members[c]
            order = [idx[i] for i in rng.permutation(len(idx))]
            cuts = np.round(np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(order)).astype(int).tolist()
            start = 0
            for k, end in enumerate(cuts):
                clients[k] += order[start:end]
                start = end
        if min(len(c) for c in clients) >= min_size:
            return [sorted(c) for c in clients]
    raise ConfigError(
        f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} example(s) in {max_tries} draws "
        f"({len(labels)} examples, {num_clients} clients); raise alpha, lower min_client_size or use fewer clients"
    )


def shard_partition(
    labels: Sequence, num_clients: int, shards_per_client: int, seed: int, min_size: int = 1
) -> list[list[int]]:
    """FedAvg's pathological split: examples sorted by label are cut into ``num_clients * shards_per_client``
    equal shards and each client draws ``shards_per_client`` of them at random, so it sees few classes."""
    require(shards_per_client >= 1, f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    _check_counts(len(labels), num_shards, min_size)  # every shard, hence every client, gets min_size
    classes, members = _classes(labels)
    rng = _rng(seed)
    by_label = [members[c][j] for c in classes for j in rng.permutation(len(members[c]))]
    shards = [
        by_label[s * len(by_label) // num_shards : (s + 1) * len(by_label) // num_shards] for s in range(num_shards)
    ]
    deal = rng.permutation(num_shards).tolist()
    return [
        sorted(i for s in deal[c * shards_per_client : (c + 1) * shards_per_client] for i in shards[s])
        for c in range(num_clients)
    ]


def domain_partition(
    domains: Sequence, labels: Sequence, num_clients: int, seed: int, alpha: float | None = None, min_size: int = 1
) -> list[list[int]]:
    """Feature non-IID as in LoRA-FAIR: each client holds data of one domain only. Clients are dealt to the
    sorted domains in turn (client k gets domain k mod D), and a domain's examples are split among its clients
    IID, or by ``Dirichlet(alpha)`` over labels (feature + label non-IID) when ``alpha`` is given."""
    names = sorted(set(domains), key=str)
    if num_clients < len(names):
        raise ConfigError(
            f"a domain partition needs at least one client per domain: {len(names)} domains {names}, got {num_clients} clients"
        )
    result: list[list[int]] = [[] for _ in range(num_clients)]
    for d, name in enumerate(names):
        owners = list(range(d, num_clients, len(names)))
        idx = [i for i, dom in enumerate(domains) if dom == name]
        try:
            if alpha is None:
                parts = iid_partition(len(idx), len(owners), seed * 31 + d, min_size)
            else:
                parts = dirichlet_partition([labels[i] for i in idx], len(owners), alpha, seed * 31 + d, min_size)
        except ConfigError as error:
            raise ConfigError(f"domain {name!r}: {error}") from None
        for owner, part in zip(owners, parts):
            result[owner] = [idx[i] for i in part]
    return result


def partition(
    kind: str,
    labels: Sequence,
    num_clients: int,
    seed: int,
    *,
    alpha: float | None = 0.5,
    shards_per_client: int = 2,
    domains: Sequence | None = None,
    min_size: int = 1,
) -> list[list[int]]:
    """Dispatch by name: ``iid``, ``dirichlet`` (``alpha``), ``shards`` (``shards_per_client``) or ``domain``
    (needs ``domains``; ``alpha`` adds a Dirichlet label split inside each domain when not None)."""
    if kind == "iid":
        return iid_partition(len(labels), num_clients, seed, min_size)
    if kind == "dirichlet":
        if alpha is None:
            raise ConfigError("partition 'dirichlet' needs alpha > 0, got alpha=None")
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    if kind == "shards":
        return shard_partition(labels, num_clients, shards_per_client, seed, min_size)
    if kind == "domain":
        if domains is None:
            raise ConfigError("partition 'domain' needs a source with domains (e.g. TwentyNewsgroups(labels='domain'))")
        return domain_partition(domains, labels, num_clients, seed, alpha, min_size)
    raise ConfigError(f"unknown partition {kind!r}; choose one of {PARTITIONS}")


def label_histogram(labels: Sequence[int], clients: list[list[int]], num_classes: int) -> torch.Tensor:
    """``H[k, c]``: how many examples of class ``c`` client ``k`` holds (labels are class ids)."""
    histogram = torch.zeros(len(clients), num_classes, dtype=torch.long)
    for k, indices in enumerate(clients):
        if indices:
            histogram[k] = torch.bincount(torch.as_tensor([labels[i] for i in indices]), minlength=num_classes)
    return histogram


__all__ = [
    "PARTITIONS",
    "dirichlet_partition",
    "domain_partition",
    "iid_partition",
    "label_histogram",
    "partition",
    "shard_partition",
]
