"""Continual-learning summaries of the accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training task ``i`` (0-based, ``T`` tasks). Entries never
measured are NaN. Every summary reads only the entries its formula names, so a matrix whose upper triangle is
NaN (validation on seen tasks only) and one that is full give the same ACC, forgetting and BWT.

======================  ==================================================================  ==================
summary                 formula                                                             source
======================  ==================================================================  ==================
average accuracy        ACC = 1/T sum_j R[T-1, j]                                           GEM (2017)
avg. incremental acc.   AIA = 1/T sum_i ( 1/(i+1) sum_{j<=i} R[i, j] )                       iCaRL (2017)
forgetting              F = 1/(T-1) sum_{j<T-1} ( max_{j<=l<T-1} R[l, j] - R[T-1, j] )      Chaudhry (2018)
backward transfer       BWT = 1/(T-1) sum_{j<T-1} ( R[T-1, j] - R[j, j] )                   GEM (2017)
forward transfer        FWT = 1/(T-1) sum_{i>=1} ( R[i-1, i] - b[i] ), b = before training  GEM (2017)
======================  ==================================================================  ==================

Forgetting uses the best accuracy a task ever had (Chaudhry, Mammoth, PILOT), not the accuracy right after
its own training (Avalanche); BWT divides by ``T - 1`` as the GEM paper does, not by ``T`` as GEM's code does.
Summaries that need two tasks are NaN for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _as_matrix(R: Tensor | list[list[float]]) -> Tensor:
    R = torch.as_tensor(R, dtype=torch.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square (tasks x tasks), got shape {tuple(R.shape)}")
    return R


def average_accuracy(R: Tensor | list[list[float]]) -> float:
    R = _as_matrix(R)
    return R[-1].mean().item()


def average_incremental_accuracy(R: Tensor | list[list[float]]) -> float:
    R = _as_matrix(R)
    return sum(R[i, : i + 1].mean().item() for i in range(len(R))) / len(R)


def forgetting(R: Tensor | list[list[float]]) -> float:
    R = _as_matrix(R)
    T = len(R)
    if T < 2:
        return math.nan
    return sum((R[j : T - 1, j].max() - R[T - 1, j]).item() for j in range(T - 1)) / (T - 1)


def backward_transfer(R: Tensor | list[list[float]]) -> float:
    R = _as_matrix(R)
    T = len(R)
    if T < 2:
        return math.nan
    return sum((R[T - 1, j] - R[j, j]).item() for j in range(T - 1)) / (T - 1)


def forward_transfer(R: Tensor | list[list[float]], baseline: Tensor | list[float]) -> float:
    R = _as_matrix(R)
    baseline = torch.as_tensor(baseline, dtype=torch.float64)
    T = len(R)
    if T < 2:
        return math.nan
    return sum((R[i - 1, i] - baseline[i]).item() for i in range(1, T)) / (T - 1)


@dataclass
class ContinualSummary:
    """Every summary of one accuracy matrix; ``fwt`` is NaN unless the upper diagonal and a baseline exist."""

    avg_acc: float
    avg_inc_acc: float
    forgetting: float
    bwt: float
    fwt: float

    @classmethod
    def of(cls, R: Tensor | list[list[float]], baseline: Tensor | list[float] | None = None) -> ContinualSummary:
        R = _as_matrix(R)
        has_upper = len(R) > 1 and not torch.isnan(R.diagonal(1)).any()
        fwt = forward_transfer(R, baseline) if baseline is not None and has_upper else math.nan
        return cls(average_accuracy(R), average_incremental_accuracy(R), forgetting(R), backward_transfer(R), fwt)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)
