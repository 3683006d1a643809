"""Federated LoRA aggregation rules as pure functions over client adapter factors.

Per adapted layer a client ``k`` returns ``A_k (r_k x d_in)`` and ``B_k (d_out x r_k)``; every client uses the
same scale ``s = alpha / r`` (one ``LoRAConfig`` per run), so client ``k``'s weight update is ``s B_k A_k``. With
sample weights ``p_k = n_k / sum_j n_j`` the *ideal* global update is ``s sum_k p_k B_k A_k``: the average of the
client models. The rules differ in how close they get to it and in what travels:

=========== ========================================================== =========== ===============
rule        next round's global adapter                                exact?      needs equal r
=========== ========================================================== =========== ===============
FedIT       ``A = sum p_k A_k``, ``B = sum p_k B_k``                    no          yes
FFA-LoRA    ``A`` frozen at a shared init, ``B = sum p_k B_k``          yes         yes
LoRA-FAIR   FedIT's average, then ``B += dB*`` (cosine to the ideal)   no (closer) yes
FlexLoRA    rank-r truncated SVD of ``sum p_k B_k A_k``                 no (trunc.) no
FLoRA       stack ``[B_1..B_K] [p_1 A_1; ..; p_K A_K]``, merged; re-init yes         no
=========== ========================================================== =========== ===============

Every function works in factored form: the SVDs run on a core of size at most ``min(d_out, m) x min(d_in, m)``
for ``m = sum_k r_k``, and only :func:`ideal_update`, which exists to check the others, forms the dense
``d_out x d_in`` update. Sources of each rule's equations: ``shared/specs/fl_methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plan.errors import ConfigError, require
from plan.subspace import factored_svd

Factors = tuple[Tensor, Tensor]  # (A: r x d_in, B: d_out x r)


@dataclass
class ClientUpdate:
    """What one client sends back after local training (before a rule decides which parts travel)."""

    client: int
    num_samples: int
    adapters: dict[str, Factors]
    head: dict[str, Tensor]


@dataclass
class GlobalState:
    """The server's model: the adapter every client starts the next round from, the head, and (FLoRA) the
    low-rank update the round merged into the frozen weights, as ``(A, B)`` with the scale folded into ``B``."""

    adapters: dict[str, Factors]
    head: dict[str, Tensor]
    merged: dict[str, Factors] = field(default_factory=dict)
    reinit: bool = False  # the slot starts fresh next round (FLoRA); the driver then records the fresh factors


# -- the algebra every rule uses ---------------------------------------------------------------------------


def client_weights(updates: list[ClientUpdate]) -> Tensor:
    """``p_k = n_k / sum_j n_j`` (float64), FedIT's sample weighting."""
    counts = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    if len(updates) == 0 or counts.sum() <= 0:
        raise ValueError("aggregation needs at least one client update with samples")
    return counts / counts.sum()


def weighted_sum(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """``sum_k w_k t_k`` accumulated in float64, returned in the tensors' dtype."""
    total = sum(w * t.double() for w, t in zip(weights.tolist(), tensors))
    return total.to(tensors[0].dtype)


def average_head(updates: list[ClientUpdate], weights: Tensor) -> dict[str, Tensor]:
    return {name: weighted_sum([u.head[name] for u in updates], weights) for name in updates[0].head}


def stacked_factors(updates: list[ClientUpdate], layer: str, weights: Tensor) -> Factors:
    """``(A_stk, B_stk)`` with ``B_stk A_stk = sum_k p_k B_k A_k``: B's side by side, ``p_k A_k`` stacked."""
    a = torch.cat([w * u.adapters[layer][0].double() for w, u in zip(weights.tolist(), updates)], dim=0)
    b = torch.cat([u.adapters[layer][1].double() for u in updates], dim=1)
    return a, b


def ideal_update(updates: list[ClientUpdate], layer: str, scale: float) -> Tensor:
    """The dense ``s sum_k p_k B_k A_k`` (float64): the reference the rules are measured against."""
    a, b = stacked_factors(updates, layer, client_weights(updates))
    return scale * (b @ a)


def factored_inner(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """``<B1 A1, B2 A2>`` (Frobenius) as ``sum((B1^T B2) * (A1 A2^T))``, without forming either product."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def agreement(updates: list[ClientUpdate], state: GlobalState, scale: float) -> tuple[float, float]:
    """How close a rule's new global update is to the ideal ``s sum_k p_k B_k A_k``: the mean over layers of
    the cosine and of the relative error ``||global - ideal|| / ||ideal||``, all in factored form. The global
    update is the slot's ``s B A``, or for a merging rule (FLoRA) what it merged."""
    p = client_weights(updates)
    cosines, errors = [], []
    for layer in updates[0].adapters:
        a_i, b_i = stacked_factors(updates, layer, p)
        b_i = scale * b_i
        a_g, b_g = state.merged[layer] if state.reinit else state.adapters[layer]
        a_g, b_g = a_g.double(), b_g.double() * (1.0 if state.reinit else scale)
        ideal, rule, cross = (
            factored_inner(a_i, b_i, a_i, b_i),
            factored_inner(a_g, b_g, a_g, b_g),
            factored_inner(a_i, b_i, a_g, b_g),
        )
        if ideal <= 0:
            continue
        cosines.append(float(cross / (ideal * rule).clamp_min(1e-300).sqrt()))
        errors.append(math.sqrt(max(float(ideal + rule - 2 * cross), 0.0) / float(ideal)))
    if not cosines:
        return float("nan"), float("nan")
    return sum(cosines) / len(cosines), sum(errors) / len(errors)


# -- the rules as functions ------------------------------------------------------------------------------


def fedit(updates: list[ClientUpdate]) -> GlobalState:
    """FedAvg of the factors: ``(sum p B)(sum p A) != sum p B A`` in general; the gap is
    ``sum_k p_k (B_k - B_bar)(A_k - A_bar)``, the factors' weighted covariance."""
    p = client_weights(updates)
    adapters = {
        layer: (
            weighted_sum([u.adapters[layer][0] for u in updates], p),
            weighted_sum([u.adapters[layer][1] for u in updates], p),
        )
        for layer in updates[0].adapters
    }
    return GlobalState(adapters, average_head(updates, p))


def ffa_lora(updates: list[ClientUpdate], shared_A: dict[str, Tensor]) -> GlobalState:
    """FFA-LoRA: every client kept ``A`` frozen at ``shared_A``, so ``sum p_k B_k A = (sum p_k B_k) A``: exact."""
    for u in updates:
        for layer, (a, _) in u.adapters.items():
            if not torch.equal(a, shared_A[layer]):
                raise ConfigError(
                    f"FFA-LoRA needs A frozen at its shared init, but client {u.client} returned a different A for "
                    f"layer '{layer}' (max change {(a - shared_A[layer]).abs().max().item():.3g}); keep lora_A frozen"
                )
    p = client_weights(updates)
    adapters = {
        layer: (shared_A[layer], weighted_sum([u.adapters[layer][1] for u in updates], p))
        for layer in updates[0].adapters
    }
    return GlobalState(adapters, average_head(updates, p))


def fair_correction(
    a_stk: Tensor, b_stk: Tensor, a_bar: Tensor, b_bar: Tensor, lam: float = 0.01, steps: int = 1000, lr: float = 0.01
) -> Tensor:
    """LoRA-FAIR's server residual: ``dB* = argmin 1 - cos(B_stk A_stk, (B_bar + dB) A_bar) + lam ||dB||^2``
    by plain SGD from ``dB = 0`` (the reimplementations' lr 0.01, 1000 steps). Layers of one shape may be
    batched along a leading dimension; each layer's loss is independent of the others'.

    ``A_bar`` is fixed, so the target ``T = B_stk A_stk`` enters the loss only through ``T A_bar^T`` (d x r)
    and ``||T||``, both computed once: each SGD step then costs O(d r^2), whatever the number of clients. The
    gradient is written out rather than taken by autograd (the same iterates to rounding; the solve for
    MiniLM's 12 layers went from 729 to 343 ms, ``benchmarks/federated.py server``): with ``B = B_bar + dB``, ``G = A_bar A_bar^T``, ``u = <B, T A_bar^T>`` and ``q = <B, B G>``,
    ``cos = u / (sqrt(q) ||T||)`` and ``d loss / d dB = (u/q B G - T A_bar^T) / (sqrt(q) ||T||) + 2 lam dB``."""
    t = lambda m: m.transpose(-1, -2)
    a_stk, b_stk, a_bar, b_bar = (m.detach().double() for m in (a_stk, b_stk, a_bar, b_bar))
    target = b_stk @ (a_stk @ t(a_bar))
    gram = a_bar @ t(a_bar)
    target_norm = ((t(b_stk) @ b_stk) * (a_stk @ t(a_stk))).sum((-1, -2), keepdim=True).clamp_min(1e-300).sqrt()
    delta = torch.zeros_like(b_bar)
    for _ in range(steps):
        b = b_bar + delta
        b_gram = b @ gram
        u = (b * target).sum((-1, -2), keepdim=True)
        q = (b * b_gram).sum((-1, -2), keepdim=True).clamp_min(1e-300)
        grad = (u / q * b_gram - target) / (q.sqrt() * target_norm) + 2 * lam * delta
        delta -= lr * grad
    return delta


def lora_fair(updates: list[ClientUpdate], lam: float = 0.01, steps: int = 1000, lr: float = 0.01) -> GlobalState:
    """LoRA-FAIR: FedIT's averages, then ``B_bar + dB*`` (:func:`fair_correction`); ``A_bar`` is kept, and
    clients start the next round from ``(A_bar, B_bar + dB*)`` (the paper's Avg-Initial). Layers with equal
    shapes are solved together as one batch."""
    base = fedit(updates)
    p = client_weights(updates)
    groups: dict[tuple, list[str]] = {}
    for layer, (a, b) in base.adapters.items():
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(layer)
    adapters = {}
    for layers in groups.values():
        stacks = [stacked_factors(updates, layer, p) for layer in layers]
        a_stk, b_stk = torch.stack([s[0] for s in stacks]), torch.stack([s[1] for s in stacks])
        a_bar = torch.stack([base.adapters[layer][0] for layer in layers])
        b_bar = torch.stack([base.adapters[layer][1] for layer in layers])
        delta = fair_correction(a_stk, b_stk, a_bar, b_bar, lam, steps, lr)
        for i, layer in enumerate(layers):
            adapters[layer] = (base.adapters[layer][0], (b_bar[i].double() + delta[i]).to(b_bar.dtype))
    return GlobalState(adapters, base.head)


def flexlora(updates: list[ClientUpdate], rank: int, homogeneous: str = "fedit") -> GlobalState:
    """FlexLoRA: the rank-``rank`` truncated SVD of ``sum p_k B_k A_k`` as ``A = Vh_r``, ``B = U_r S_r``. Its
    error is the Eckart-Young tail ``sum_{i > r} sigma_i^2``; a client of rank ``r_k < rank`` takes the first
    ``r_k`` components, which is the rank-``r_k`` truncation. Client ranks may differ.

    As in the official code, which hands out components of a full SVD, no row of ``A`` is ever zero: when the
    sum has rank below ``rank`` (the round's client ranks sum to less), the missing rows of ``A`` are
    orthonormal directions outside its row space, with zero ``B`` columns, so they can still learn (a zero row
    of ``A`` gets exactly zero gradient for good). With every client at ``rank`` and ``homogeneous='fedit'``
    (the official code's homogeneous setting) the rule is FedIT's average; ``'svd'`` keeps the SVD."""
    require(homogeneous in ("fedit", "svd"), f"FlexLoRA homogeneous must be 'fedit' or 'svd', got {homogeneous!r}")
    if homogeneous == "fedit" and all(a.shape[0] == rank for u in updates for a, _ in u.adapters.values()):
        return fedit(updates)
    p = client_weights(updates)
    adapters = {}
    for layer in updates[0].adapters:
        a_stk, b_stk = stacked_factors(updates, layer, p)
        u, s, vh = factored_svd(a_stk, b_stk)
        keep = min(rank, len(s))
        a = torch.cat([vh[:keep], orthonormal_complement(vh[:keep], rank - keep)])
        b = torch.zeros(b_stk.shape[0], rank, dtype=torch.float64)
        b[:, :keep] = u[:, :keep] * s[:keep]
        dtype = updates[0].adapters[layer][0].dtype
        adapters[layer] = (a.to(dtype), b.to(dtype))
    return GlobalState(adapters, average_head(updates, p))


def orthonormal_complement(rows: Tensor, count: int) -> Tensor:
    """``count`` orthonormal rows orthogonal to the orthonormal ``rows``: the first directions of the standard
    basis left once ``rows`` are projected out (a deterministic choice)."""
    width = rows.shape[1]
    q, _ = torch.linalg.qr(torch.cat([rows.T, torch.eye(width, dtype=rows.dtype)], dim=1))
    return q[:, rows.shape[0] : rows.shape[0] + count].T


def flora(updates: list[ClientUpdate], scale: float) -> GlobalState:
    """FLoRA: the stacked factors multiply out to exactly ``s sum_k p_k B_k A_k``; they are merged into the
    frozen weights and every client starts the next round from a fresh adapter. Client ranks may differ."""
    p = client_weights(updates)
    merged = {}
    for layer in updates[0].adapters:
        a_stk, b_stk = stacked_factors(updates, layer, p)
        dtype = updates[0].adapters[layer][0].dtype
        merged[layer] = (a_stk.to(dtype), (scale * b_stk).to(dtype))
    return GlobalState({}, average_head(updates, p), merged=merged, reinit=True)


# -- faults ------------------------------------------------------------------------------------------------


def update_norm(update: ClientUpdate, start: GlobalState) -> float:
    """Euclidean norm of everything a client changed relative to the state it started the round from (a
    client of rank ``r_k`` started from the first ``r_k`` components of the global adapter)."""
    total = 0.0
    for layer, (a, b) in update.adapters.items():
        a0, b0 = start.adapters[layer]
        rank = a.shape[0]
        total += float(
            (a.double() - a0[:rank].double()).pow(2).sum() + (b.double() - b0[:, :rank].double()).pow(2).sum()
        )
    for name, tensor in update.head.items():
        total += float((tensor.double() - start.head[name].double()).pow(2).sum())
    return math.sqrt(total)


def screen_updates(
    updates: list[ClientUpdate], start: GlobalState, norm_ratio: float = 10.0
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Split updates into usable ones and excluded ones with the reason: any NaN/Inf, or an update norm more
    than ``norm_ratio`` times the median norm of the round's finite updates."""
    excluded: dict[int, str] = {}
    finite = []
    for u in updates:
        tensors = [t for pair in u.adapters.values() for t in pair] + list(u.head.values())
        if not all(torch.isfinite(t).all() for t in tensors):
            excluded[u.client] = "NaN/Inf in its update"
        else:
            finite.append(u)
    norms = {u.client: update_norm(u, start) for u in finite}
    if len(finite) >= 3:
        median = float(torch.tensor(list(norms.values())).median())
        for u in finite:
            if median > 0 and norms[u.client] > norm_ratio * median:
                excluded[u.client] = (
                    f"update norm {norms[u.client]:.3g} > {norm_ratio:g} x the round's median {median:.3g}"
                )
    return [u for u in finite if u.client not in excluded], excluded


# -- the rules as configurable objects -------------------------------------------------------------------


class AggregationRule:
    """One federated LoRA rule: how replies combine (:meth:`aggregate`) and what travels each way.

    ``trains_A``: whether clients train the down-projection; ``equal_ranks``: whether all clients must use one
    rank. Payload sizes are float counts per client per round (the head travels both ways in every rule)."""

    name = "rule"
    trains_A = True
    equal_ranks = True

    def aggregate(self, updates: list[ClientUpdate], current: GlobalState, scale: float, rank: int) -> GlobalState:
        raise NotImplementedError

    def upload_numel(self, update: ClientUpdate) -> int:
        """Floats one client sends up: its A and B (and head) by default."""
        return sum(a.numel() + b.numel() for a, b in update.adapters.values()) + _head_numel(update.head)

    def download_numel(self, state: GlobalState, client_rank: int, first_round: bool) -> int:
        """Floats the server sends one client at a round start: the client's share of A and B, and the head."""
        return sum((a.shape[1] + b.shape[0]) * client_rank for a, b in state.adapters.values()) + _head_numel(
            state.head
        )


def _head_numel(head: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in head.values())


class FedIT(AggregationRule):
    """Sample-weighted FedAvg of A and B (Zhang et al., ICASSP 2024)."""

    name = "fedit"

    def aggregate(self, updates, current, scale, rank):
        return fedit(updates)


class FFALoRA(AggregationRule):
    """A frozen at the shared seeded init; only B is trained and sent (Sun et al., ICLR 2024): exact."""

    name = "ffa_lora"
    trains_A = False

    def aggregate(self, updates, current, scale, rank):
        return ffa_lora(updates, {layer: a for layer, (a, _) in current.adapters.items()})

    def upload_numel(self, update):
        return sum(b.numel() for _, b in update.adapters.values()) + _head_numel(update.head)

    def download_numel(self, state, client_rank, first_round):
        a_once = sum(a.shape[1] * client_rank for a, _ in state.adapters.values()) if first_round else 0
        return a_once + sum(b.shape[0] * client_rank for _, b in state.adapters.values()) + _head_numel(state.head)


class LoRAFAIR(AggregationRule):
    """FedIT plus the server-side correction of B (Bian et al., ICCV 2025); same payloads as FedIT.

    Args:
        lam: weight of ``||dB||^2``, which keeps ``B`` near the average (the paper's 0.01).
        steps, lr: the server's SGD on ``dB``."""

    name = "lora_fair"

    def __init__(self, lam: float = 0.01, steps: int = 1000, lr: float = 0.01) -> None:
        for key, value, valid in (("lam", lam, lam >= 0), ("steps", steps, steps >= 1), ("lr", lr, lr > 0)):
            require(valid, f"LoRAFAIR needs lam >= 0, steps >= 1 and lr > 0; got {key}={value}")
        self.lam, self.steps, self.lr = lam, steps, lr

    def aggregate(self, updates, current, scale, rank):
        return lora_fair(updates, self.lam, self.steps, self.lr)


class FlexLoRA(AggregationRule):
    """SVD redistribution of the weighted sum of client updates (Bai et al., NeurIPS 2024); ranks may differ.

    Args:
        homogeneous: when every client has the global rank, ``fedit`` averages the factors as the official code
            does, ``svd`` redistributes the SVD anyway."""

    name = "flexlora"
    equal_ranks = False

    def __init__(self, homogeneous: str = "fedit") -> None:
        require(homogeneous in ("fedit", "svd"), f"FlexLoRA homogeneous must be 'fedit' or 'svd', got {homogeneous!r}")
        self.homogeneous = homogeneous

    def aggregate(self, updates, current, scale, rank):
        return flexlora(updates, rank, self.homogeneous)


class FLoRA(AggregationRule):
    """Stacking with merge and re-initialisation (Wang et al., NeurIPS 2024); exact, ranks may differ. The
    download is the whole stack of the last round (every client's factors), so it grows with the clients."""

    name = "flora"
    equal_ranks = False

    def aggregate(self, updates, current, scale, rank):
        return flora(updates, scale)

    def download_numel(self, state, client_rank, first_round):
        stack = sum(a.numel() + b.numel() for a, b in state.merged.values())
        return stack + _head_numel(state.head)


RULES: dict[str, type[AggregationRule]] = {rule.name: rule for rule in (FedIT, FFALoRA, LoRAFAIR, FlexLoRA, FLoRA)}


def make_rule(rule: str | AggregationRule) -> AggregationRule:
    """A rule object from its name (``fedit``, ``ffa_lora``, ``lora_fair``, ``flexlora``, ``flora``) or as given."""
    if isinstance(rule, AggregationRule):
        return rule
    if rule not in RULES:
        raise ConfigError(
            f"unknown aggregation rule {rule!r}; choose one of {sorted(RULES)} (or pass a plan.aggregation.AggregationRule)"
        )
    return RULES[rule]()


__all__ = [
    "RULES",
    "AggregationRule",
    "ClientUpdate",
    "FFALoRA",
    "FLoRA",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "LoRAFAIR",
    "agreement",
    "client_weights",
    "factored_inner",
    "fair_correction",
    "fedit",
    "ffa_lora",
    "flexlora",
    "flora",
    "ideal_update",
    "lora_fair",
    "make_rule",
    "screen_updates",
    "stacked_factors",
    "update_norm",
]
