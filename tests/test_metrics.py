"""The continual-learning summaries of ``plan.metrics`` against the formulas of its module docstring.

Each summary is checked three ways: against a plain-Python loop over the stated formula on seeded random
matrices, against figures worked out by hand, and on the edge cases the docstring promises (NaN upper
triangle, one task, non-square input).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from plan.metrics import (
    ContinualSummary,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)

# -- independent reference: the docstring formulas as plain loops over lists -----------------------------


def ref_acc(R: list[list[float]]) -> float:
    T = len(R)
    return sum(R[T - 1][j] for j in range(T)) / T


def ref_aia(R: list[list[float]]) -> float:
    T = len(R)
    return sum(sum(R[i][j] for j in range(i + 1)) / (i + 1) for i in range(T)) / T


def ref_forgetting(R: list[list[float]]) -> float:
    T = len(R)
    if T < 2:
        return math.nan
    total = 0.0
    for j in range(T - 1):
        best = max(R[i][j] for i in range(j, T - 1))
        total += best - R[T - 1][j]
    return total / (T - 1)


def ref_bwt(R: list[list[float]]) -> float:
    T = len(R)
    if T < 2:
        return math.nan
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def ref_fwt(R: list[list[float]], b: list[float]) -> float:
    T = len(R)
    if T < 2:
        return math.nan
    return sum(R[i - 1][i] - b[i] for i in range(1, T)) / (T - 1)


def random_matrix(size: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.uniform(0, 100) for _ in range(size)] for _ in range(size)]


def with_nan_upper(R: list[list[float]]) -> list[list[float]]:
    return [[v if j <= i else math.nan for j, v in enumerate(row)] for i, row in enumerate(R)]


CASES = [(size, seed) for size in (2, 3, 5, 8) for seed in (0, 1, 2)]

# Hand-checked example (percent): rows = after training task i, columns = task j.
PAPER_R = [[92, 67, 52, 45], [92, 91, 61, 47], [83, 81, 96, 77], [80, 79, 97, 95]]
DIAGONAL_R = [[75.0 if j == i else 0.0 for j in range(5)] for i in range(5)]


# -- against the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("size,seed", CASES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
def test_summaries_match_reference_loops(size: int, seed: int, as_tensor: bool) -> None:
    """Every summary equals the docstring formula computed by plain loops, for lists and tensors alike."""
    R = random_matrix(size, seed)
    b = [random.Random(seed + 100).uniform(0, 100) for _ in range(size)]
    arg = torch.tensor(R) if as_tensor else R
    assert average_accuracy(arg) == pytest.approx(ref_acc(R))
    assert average_incremental_accuracy(arg) == pytest.approx(ref_aia(R))
    assert forgetting(arg) == pytest.approx(ref_forgetting(R))
    assert backward_transfer(arg) == pytest.approx(ref_bwt(R))
    assert forward_transfer(arg, torch.tensor(b) if as_tensor else b) == pytest.approx(ref_fwt(R, b))


@pytest.mark.parametrize("size,seed", CASES)
def test_summary_object_matches_reference(size: int, seed: int) -> None:
    """ContinualSummary.of gathers the same numbers, with FWT from the baseline vector."""
    R = random_matrix(size, seed)
    b = [random.Random(seed + 100).uniform(0, 100) for _ in range(size)]
    summary = ContinualSummary.of(R, baseline=b)
    assert summary.avg_acc == pytest.approx(ref_acc(R))
    assert summary.avg_inc_acc == pytest.approx(ref_aia(R))
    assert summary.forgetting == pytest.approx(ref_forgetting(R))
    assert summary.bwt == pytest.approx(ref_bwt(R))
    assert summary.fwt == pytest.approx(ref_fwt(R, b))
    assert set(summary.as_dict()) == {"avg_acc", "avg_inc_acc", "forgetting", "bwt", "fwt"}


# -- hand-checked figures -------------------------------------------------------------------------------


def test_hand_checked_four_task_matrix() -> None:
    """ACC = 351/4, forgetting = (12 + 12 - 1)/3, BWT = (-12 - 12 + 1)/3 on the worked example."""
    assert average_accuracy(PAPER_R) == pytest.approx(87.75)
    assert forgetting(PAPER_R) == pytest.approx(23 / 3)
    assert forgetting(PAPER_R) == pytest.approx(7.667, abs=1e-3)
    assert backward_transfer(PAPER_R) == pytest.approx(-23 / 3)
    # AIA by hand: 92, (92+91)/2, (83+81+96)/3, 351/4
    assert average_incremental_accuracy(PAPER_R) == pytest.approx((92 + 91.5 + 260 / 3 + 87.75) / 4)


def test_hand_checked_diagonal_matrix() -> None:
    """A learner that forgets everything at once: ACC = 75/5, forgetting = 75, BWT = -75."""
    assert average_accuracy(DIAGONAL_R) == pytest.approx(15.0)
    assert forgetting(DIAGONAL_R) == pytest.approx(75.0)
    assert backward_transfer(DIAGONAL_R) == pytest.approx(-75.0)


def test_forgetting_uses_best_earlier_accuracy_not_own_training() -> None:
    """Forgetting takes the max over rows j..T-2 (Chaudhry), which can exceed R[j, j]; BWT uses R[j, j]."""
    R = [[50, 0, 0], [90, 60, 0], [40, 60, 70]]
    assert forgetting(R) == pytest.approx(((90 - 40) + (60 - 60)) / 2)
    assert backward_transfer(R) == pytest.approx(((40 - 50) + (60 - 60)) / 2)


# -- edge cases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,seed", CASES)
def test_nan_upper_triangle_changes_nothing(size: int, seed: int) -> None:
    """Validating only on seen tasks (NaN above the diagonal) gives the same ACC, AIA, forgetting and BWT."""
    R = random_matrix(size, seed)
    lower = with_nan_upper(R)
    for summary in (average_accuracy, average_incremental_accuracy, forgetting, backward_transfer):
        full, partial = summary(R), summary(lower)
        assert not math.isnan(partial), summary.__name__
        assert partial == pytest.approx(full), summary.__name__
    # FWT needs the first upper diagonal: without it the summary reports NaN rather than a number.
    assert math.isnan(ContinualSummary.of(lower, baseline=[0.0] * size).fwt)


def test_single_task_gives_nan_for_two_task_summaries() -> None:
    """With one task there is nothing to forget or transfer: forgetting, BWT and FWT are NaN."""
    R = [[42.0]]
    assert math.isnan(forgetting(R))
    assert math.isnan(backward_transfer(R))
    assert math.isnan(forward_transfer(R, [10.0]))
    assert average_accuracy(R) == pytest.approx(42.0)
    assert average_incremental_accuracy(R) == pytest.approx(42.0)
    summary = ContinualSummary.of(R, baseline=[10.0])
    assert math.isnan(summary.forgetting) and math.isnan(summary.bwt) and math.isnan(summary.fwt)


def test_forward_transfer_formula_with_baseline() -> None:
    """FWT = mean over i >= 1 of (R[i-1, i] - b[i]); b[0] is never read."""
    R = [[80, 30, 20], [70, 85, 40], [60, 75, 90]]
    b = [1e9, 10, 25]
    assert forward_transfer(R, b) == pytest.approx(((30 - 10) + (40 - 25)) / 2)


def test_summary_without_baseline_has_nan_fwt() -> None:
    """ContinualSummary.of leaves FWT NaN when no baseline is given, even on a full matrix."""
    summary = ContinualSummary.of(PAPER_R)
    assert math.isnan(summary.fwt)
    assert summary.avg_acc == pytest.approx(87.75)
    assert summary.forgetting == pytest.approx(23 / 3)


@pytest.mark.parametrize(
    "bad", [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [1.0, 2.0], torch.zeros(2, 2, 2)], ids=["2x3", "vector", "3d"]
)
@pytest.mark.parametrize(
    "summary",
    [
        average_accuracy,
        average_incremental_accuracy,
        forgetting,
        backward_transfer,
        lambda R: forward_transfer(R, [0.0, 0.0]),
        ContinualSummary.of,
    ],
    ids=["acc", "aia", "forgetting", "bwt", "fwt", "summary"],
)
def test_non_square_matrix_raises(bad, summary) -> None:
    """Anything but a tasks x tasks matrix is refused with a ValueError."""
    with pytest.raises(ValueError, match="square"):
        summary(bad)
