"""Client partitions: every example goes to exactly one client, seeds reproduce, skew follows alpha, errors name
the bad value."""

from __future__ import annotations

import pytest
import torch

from plan.partition import (
    dirichlet_partition,
    domain_partition,
    iid_partition,
    label_histogram,
    partition,
    shard_partition,
)

LABELS = [i % 5 for i in range(600)]


def assert_exact_cover(clients: list[list[int]], n: int) -> None:
    flat = [i for c in clients for i in c]
    assert sorted(flat) == list(range(n)), "every example must belong to exactly one client"


def max_class_share(labels: list[int], clients: list[list[int]]) -> float:
    """Mean over clients of the share of its largest class: 1/classes for IID, 1 for single-class clients."""
    histogram = label_histogram(labels, clients, 5).double()
    return (histogram.max(1).values / histogram.sum(1)).mean().item()


def test_iid_is_balanced_exact_and_seeded():
    clients = iid_partition(103, 10, seed=3)
    assert_exact_cover(clients, 103)
    assert {len(c) for c in clients} == {10, 11}
    assert clients == iid_partition(103, 10, seed=3)
    assert clients != iid_partition(103, 10, seed=4)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_covers_every_example_and_keeps_the_minimum(alpha):
    clients = dirichlet_partition(LABELS, 10, alpha, seed=0, min_size=5)
    assert_exact_cover(clients, len(LABELS))
    assert min(len(c) for c in clients) >= 5
    assert clients == dirichlet_partition(LABELS, 10, alpha, seed=0, min_size=5)


def test_dirichlet_skew_falls_as_alpha_grows():
    shares = [max_class_share(LABELS, dirichlet_partition(LABELS, 10, alpha, seed=1)) for alpha in (0.1, 1.0, 100.0)]
    assert shares[0] > shares[1] > shares[2]
    assert shares[0] > 0.6 and shares[2] < 0.35  # near one class per client vs near the IID 0.2


def test_shards_give_each_client_few_classes():
    clients = shard_partition(LABELS, 10, shards_per_client=2, seed=0)
    assert_exact_cover(clients, len(LABELS))
    histogram = label_histogram(LABELS, clients, 5)
    assert ((histogram > 0).sum(1) <= 2).all()  # 50 shards of 12, each within one class of 120


def test_domain_partition_gives_each_client_one_domain():
    domains = [f"d{i % 3}" for i in range(300)]
    labels = [i % 4 for i in range(300)]
    for alpha in (None, 0.5):
        clients = domain_partition(domains, labels, 7, seed=0, alpha=alpha)
        assert_exact_cover(clients, 300)
        for k, client in enumerate(clients):
            assert {domains[i] for i in client} == {f"d{k % 3}"}


def test_label_histogram_counts_by_hand():
    clients = [[0, 1, 5], [2, 3, 4]]
    labels = [0, 1, 1, 2, 2, 0]
    assert label_histogram(labels, clients, 3).tolist() == [[2, 1, 0], [0, 1, 2]]


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: iid_partition(5, 6, seed=0),
            r"6 clients .* need 6 examples, but the training split has 5; use at most 5 clients",
        ),
        (lambda: dirichlet_partition(LABELS, 10, 0.0, seed=0), r"alpha must be > 0.*got 0.0"),
        (lambda: dirichlet_partition(LABELS, 10, -1, seed=0), r"alpha must be > 0.*got -1"),
        (
            lambda: dirichlet_partition(LABELS, 60, 0.01, seed=0, min_size=10, max_tries=3),
            r"fewer than 10 example.*raise alpha",
        ),
        (lambda: partition("bogus", LABELS, 3, 0), r"unknown partition 'bogus'.*iid.*dirichlet"),
        (lambda: partition("domain", LABELS, 3, 0), r"needs a source with domains"),
        (
            lambda: domain_partition(["a", "b", "c"] * 3, [0] * 9, 2, seed=0),
            r"at least one client per domain: 3 domains",
        ),
    ],
)
def test_bad_partitions_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_histogram_rows_sum_to_client_sizes():
    clients = dirichlet_partition(LABELS, 8, 0.3, seed=2)
    histogram = label_histogram(LABELS, clients, 5)
    assert histogram.sum(1).tolist() == [len(c) for c in clients]
    assert torch.equal(histogram.sum(0), torch.bincount(torch.tensor(LABELS)))
