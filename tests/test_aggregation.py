"""Aggregation rules against the ideal update ``s sum_k p_k B_k A_k`` built densely in float64."""

from __future__ import annotations

import pytest
import torch

from plan.aggregation import (
    ClientUpdate,
    FedIT,
    FFALoRA,
    FLoRA,
    GlobalState,
    agreement,
    client_weights,
    fair_correction,
    fedit,
    ffa_lora,
    flexlora,
    flora,
    ideal_update,
    lora_fair,
    make_rule,
    screen_updates,
    stacked_factors,
)
from plan.subspace import compress_factors

D_OUT, D_IN, SCALE = 12, 10, 2.0


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def make_updates(ranks=(3, 3, 3, 3), shared_A: torch.Tensor | None = None, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, r in enumerate(ranks):
        a = shared_A if shared_A is not None else torch.randn(r, D_IN, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(D_OUT, r, generator=g, dtype=torch.float64) * 0.05
        head = {"weight": torch.randn(4, 6, generator=g, dtype=torch.float64)}
        updates.append(ClientUpdate(client=k, num_samples=5 + 7 * k, adapters={"layer": (a, b)}, head=head))
    return updates


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


def test_weights_follow_sample_counts():
    updates = make_updates()
    p = client_weights(updates)
    assert p.tolist() == pytest.approx([5 / 62, 12 / 62, 19 / 62, 26 / 62])


def test_stacked_factors_multiply_to_the_weighted_sum():
    updates = make_updates(ranks=(2, 3, 1))
    p = client_weights(updates)
    a, b = stacked_factors(updates, "layer", p)
    dense = sum(w * product(*u.adapters["layer"]) for w, u in zip(p.tolist(), updates))
    torch.testing.assert_close(b @ a, dense, rtol=0, atol=1e-14)


def test_fedit_gap_is_the_factor_covariance():
    """(sum p B)(sum p A) - sum p B A = -sum p (B - B_bar)(A - A_bar): FedIT is inexact by exactly that."""
    updates = make_updates()
    a_bar, b_bar = fedit(updates).adapters["layer"]
    p = client_weights(updates).tolist()
    covariance = sum(
        w * (u.adapters["layer"][1] - b_bar) @ (u.adapters["layer"][0] - a_bar) for w, u in zip(p, updates)
    )
    gap = SCALE * product(a_bar, b_bar) - ideal_update(updates, "layer", SCALE)
    torch.testing.assert_close(gap, -SCALE * covariance, rtol=0, atol=1e-12)
    assert gap.norm() > 1e-2 * ideal_update(updates, "layer", SCALE).norm()


def test_fedit_averages_the_head():
    updates = make_updates()
    p = client_weights(updates).tolist()
    torch.testing.assert_close(fedit(updates).head["weight"], sum(w * u.head["weight"] for w, u in zip(p, updates)))


def test_ffa_lora_is_exact():
    shared = torch.randn(3, D_IN, dtype=torch.float64)
    updates = make_updates(shared_A=shared)
    a, b = ffa_lora(updates, {"layer": shared}).adapters["layer"]
    assert torch.equal(a, shared)
    torch.testing.assert_close(SCALE * product(a, b), ideal_update(updates, "layer", SCALE), rtol=0, atol=1e-13)


def test_ffa_lora_refuses_a_client_that_moved_A():
    shared = torch.randn(3, D_IN, dtype=torch.float64)
    updates = make_updates(shared_A=shared)
    updates[2].adapters["layer"] = (shared + 1e-3, updates[2].adapters["layer"][1])
    with pytest.raises(ValueError, match="client 2 returned a different A for layer 'layer'"):
        ffa_lora(updates, {"layer": shared})


def test_flora_stack_is_exact_with_heterogeneous_ranks():
    updates = make_updates(ranks=(4, 2, 1, 3))
    state = flora(updates, SCALE)
    a, b = state.merged["layer"]
    assert a.shape == (10, D_IN) and b.shape == (D_OUT, 10)
    torch.testing.assert_close(product(a, b), ideal_update(updates, "layer", SCALE), rtol=0, atol=1e-13)
    assert state.reinit and state.adapters == {}


def test_flexlora_error_is_the_eckart_young_tail():
    updates = make_updates(ranks=(4, 2, 1, 3))
    ideal = ideal_update(updates, "layer", SCALE)
    sigma = torch.linalg.svdvals(ideal)
    for rank in (1, 3, 5):
        a, b = flexlora(updates, rank).adapters["layer"]
        error = (SCALE * product(a, b) - ideal).norm() ** 2
        assert error.item() == pytest.approx((sigma[rank:] ** 2).sum().item(), rel=1e-9, abs=1e-15)
    a, b = flexlora(updates, 10).adapters["layer"]  # rank >= sum of client ranks: nothing is truncated
    torch.testing.assert_close(SCALE * product(a, b), ideal, rtol=0, atol=1e-12)


def test_flexlora_leaves_no_zero_row_when_the_clients_ranks_sum_below_the_global_rank():
    """Two rank-1 clients, global rank 4: the sum has rank 2. The official code hands out components of a full
    SVD, so every row of A is a unit direction: the two of the sum's row space, then two orthogonal to it with
    zero B columns, which leave the update exact but still get gradient (a zero row of A never would)."""
    updates = make_updates(ranks=(1, 1))
    a, b = flexlora(updates, 4).adapters["layer"]
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not b[:, 2:].any() and b[:, :2].norm(dim=0).min() > 0
    torch.testing.assert_close(SCALE * product(a, b), ideal_update(updates, "layer", SCALE), rtol=0, atol=1e-12)
    row_space = torch.cat([u.adapters["layer"][0] for u in updates])  # spans the sum's rows
    assert (a[2:].double() @ row_space.T).abs().max() < 1e-12
    # the zero B columns get gradient through the completion rows (with zero rows of A they would get none)
    x = torch.randn(5, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b_param = b.clone().double().requires_grad_(True)
    (x @ a.double().T @ b_param.T).sum().backward()
    assert b_param.grad[:, 2:].norm(dim=0).min() > 0


def test_flexlora_with_every_client_at_the_global_rank_is_fedit_unless_asked_for_the_svd():
    updates = make_updates(ranks=(3, 3, 3, 3))
    fed = fedit(updates).adapters["layer"]
    torch.testing.assert_close(flexlora(updates, 3).adapters["layer"], fed, rtol=0, atol=0)
    a, b = flexlora(updates, 3, homogeneous="svd").adapters["layer"]
    ideal = ideal_update(updates, "layer", SCALE)
    tail = (torch.linalg.svdvals(ideal)[3:] ** 2).sum()
    assert ((SCALE * product(a, b) - ideal).norm() ** 2).item() == pytest.approx(tail.item(), rel=1e-9)
    with pytest.raises(ValueError, match="homogeneous must be 'fedit' or 'svd', got 'avg'"):
        flexlora(updates, 3, homogeneous="avg")


def test_lora_fair_moves_closer_to_the_ideal_than_fedit():
    updates = make_updates()
    ideal = ideal_update(updates, "layer", SCALE)
    a_avg, b_avg = fedit(updates).adapters["layer"]
    a_fair, b_fair = lora_fair(updates, lam=0.01, steps=300, lr=0.01).adapters["layer"]
    assert torch.equal(a_fair, a_avg)  # A is kept; only B is corrected
    before, after = cosine(ideal, product(a_avg, b_avg)), cosine(ideal, product(a_fair, b_fair))
    assert after > before + 0.05, (before, after)


def test_lora_fair_correction_follows_sgd_on_the_dense_objective():
    """The written-out gradient against the official objective taken literally: autograd through
    ``1 - cos(vec(B_stk A_stk), vec((B_bar + dB) A_bar)) + lam ||dB||^2`` on dense matrices, torch's SGD, two
    layers solved as one batch."""
    layers = [make_updates(seed=seed) for seed in (0, 1)]
    stacks = [stacked_factors(updates, "layer", client_weights(updates)) for updates in layers]
    bars = [fedit(updates).adapters["layer"] for updates in layers]
    a_stk, b_stk = (torch.stack([s[i] for s in stacks]) for i in (0, 1))
    a_bar, b_bar = (torch.stack([bar[i] for bar in bars]) for i in (0, 1))
    delta = fair_correction(a_stk, b_stk, a_bar, b_bar, lam=0.01, steps=200, lr=0.05)
    for i in range(2):
        target = (b_stk[i].double() @ a_stk[i].double()).flatten()
        reference = torch.zeros_like(b_bar[i], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([reference], lr=0.05)
        for _ in range(200):
            optimizer.zero_grad()
            corrected = ((b_bar[i].double() + reference) @ a_bar[i].double()).flatten()
            loss = 1 - torch.nn.functional.cosine_similarity(target, corrected, dim=0) + 0.01 * reference.pow(2).sum()
            loss.backward()
            optimizer.step()
        assert reference.detach().norm() > 1e-3  # the correction moved
        torch.testing.assert_close(delta[i], reference.detach(), rtol=1e-9, atol=1e-12)


def test_lora_fair_with_a_huge_penalty_is_fedit():
    updates = make_updates()
    a_stk, b_stk = stacked_factors(updates, "layer", client_weights(updates))
    a_bar, b_bar = fedit(updates).adapters["layer"]
    delta = fair_correction(a_stk, b_stk, a_bar, b_bar, lam=1e6, steps=50, lr=1e-8)
    assert delta.abs().max() < 1e-6


@pytest.mark.parametrize("ranks", [(3, 3, 3, 3), (4, 2, 1, 3)])
def test_agreement_measures_each_rule_against_the_dense_ideal(ranks):
    updates = make_updates(ranks=ranks)
    ideal = ideal_update(updates, "layer", SCALE)
    rules = {"flora": flora(updates, SCALE), "flexlora": flexlora(updates, 3)}
    if len(set(ranks)) == 1:
        rules["fedit"] = fedit(updates)
    for name, state in rules.items():
        a, b = state.merged["layer"] if state.reinit else state.adapters["layer"]
        dense = product(a, b) * (1.0 if state.reinit else SCALE)
        cos, err = agreement(updates, state, SCALE)
        assert cos == pytest.approx(cosine(ideal, dense), abs=1e-9), name
        assert err == pytest.approx(((dense - ideal).norm() / ideal.norm()).item(), abs=1e-7), name
    assert agreement(updates, rules["flora"], SCALE) == pytest.approx((1.0, 0.0), abs=1e-7)


def test_compress_factors_is_exact_and_no_wider_than_the_layer():
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(30, D_IN, generator=g, dtype=torch.float64),
        torch.randn(D_OUT, 30, generator=g, dtype=torch.float64),
    )
    a2, b2 = compress_factors(a, b)
    assert a2.shape == (D_IN, D_IN) and b2.shape == (D_OUT, D_IN)
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=0, atol=1e-11)
    narrow = (a[:4], b[:, :4])
    assert compress_factors(*narrow) == narrow


def start_state(updates: list[ClientUpdate]) -> GlobalState:
    a, b = updates[0].adapters["layer"]
    return GlobalState(
        {"layer": (torch.zeros_like(a), torch.zeros_like(b))}, {"weight": torch.zeros(4, 6, dtype=torch.float64)}
    )


def test_screening_excludes_nan_and_absurd_updates_and_keeps_the_rest():
    updates = make_updates(ranks=(3,) * 6)
    a, b = updates[1].adapters["layer"]
    updates[1].adapters["layer"] = (a, b.clone().fill_(float("nan")))
    updates[4].head = {"weight": updates[4].head["weight"] * 1e4}
    kept, excluded = screen_updates(updates, start_state(updates), norm_ratio=10)
    assert [u.client for u in kept] == [0, 2, 3, 5]
    assert excluded[1] == "NaN/Inf in its update" and "x the round's median" in excluded[4]


def test_payloads_follow_what_each_rule_sends():
    shared = torch.randn(3, D_IN, dtype=torch.float64)
    update = make_updates(shared_A=shared)[0]
    head = 24
    assert FedIT().upload_numel(update) == 3 * (D_IN + D_OUT) + head
    assert FFALoRA().upload_numel(update) == 3 * D_OUT + head  # B only
    state = GlobalState({"layer": (shared, torch.zeros(D_OUT, 3))}, {"weight": torch.zeros(4, 6)})
    assert FFALoRA().download_numel(state, 3, first_round=True) == 3 * (D_IN + D_OUT) + head  # A once
    assert FFALoRA().download_numel(state, 3, first_round=False) == 3 * D_OUT + head
    four, eight = flora(make_updates(ranks=(3,) * 4), SCALE), flora(make_updates(ranks=(3,) * 8), SCALE)
    assert FLoRA().download_numel(eight, 3, False) - head == 2 * (FLoRA().download_numel(four, 3, False) - head)


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown aggregation rule 'fedavg'; choose one of \['fedit', 'ffa_lora', 'flexlora', 'flora', 'lora_fair'\]",
    ):
        make_rule("fedavg")
    assert isinstance(make_rule("ffa_lora"), FFALoRA)
