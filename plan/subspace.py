"""Subspace linear algebra: input statistics, stored bases, projections, basis selection, and exact
low-rank factor algebra (SVD and recompression of a product ``B A`` without forming it).

A layer ``h = W x`` moved by ``dW`` changes its output on an old input ``x_old`` by ``dW x_old``. A LoRA update
``dW = B A`` leaves every input in span(M) untouched when the rows of ``A`` are orthogonal to span(M), so
methods that fight forgetting keep, per layer, an orthonormal basis ``M`` of the inputs old tasks used
(GPM's memory) and keep new down-projections out of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plan.errors import ConfigError


def token_gram(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """``sum_tokens x x^T`` in float64 on the CPU, and the number of tokens it sums. ``mask`` (batch x sequence,
    as an attention mask) leaves out padding positions, so that a statistic does not depend on how examples
    were batched and padded (one process or several, another batch size)."""
    x = x.detach()
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        x = x[mask.bool()]
    flat = x.reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
    return flat.T @ flat, flat.shape[0]


class InputCovariance:
    """Running uncentred second moment ``E[x x^T]`` of a layer's inputs (every token counts once), in float64."""

    def __init__(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def add(self, gram: Tensor, count: int) -> None:
        self.sum += gram
        self.count += count


def orthonormalize(vectors: Tensor, tol: float = 1e-10) -> Tensor:
    """An orthonormal basis (columns) of span(vectors' columns), dropping directions below ``tol``."""
    if vectors.shape[1] == 0:
        return vectors
    u, s, _ = torch.linalg.svd(vectors, full_matrices=False)
    return u[:, s > tol * max(s.max().item(), 1.0)]


def ordered_basis(vectors: Tensor, tol: float = 1e-8) -> Tensor:
    """An orthonormal basis of span(vectors' columns) built column by column in their order (Gram-Schmidt,
    applied twice for stability), skipping columns whose remainder is below ``tol`` times the longest column.

    Unlike an SVD basis, which may turn freely inside a subspace of equal singular values (rounding noise of
    another thread count is enough), it is a continuous function of the columns, so equal inputs up to
    rounding give equal bases up to rounding."""
    basis = torch.empty(vectors.shape[0], min(vectors.shape), dtype=vectors.dtype, device=vectors.device)
    found = 0  # the first `found` columns of `basis` are filled (written in place: no re-stacking per column)
    floor = tol * (vectors.norm(dim=0).max().item() if vectors.numel() else 0.0)
    for column in vectors.T:
        if found == basis.shape[1]:  # the whole space is spanned: every later column is dependent
            break
        rest = column
        for _ in range(2):
            if found:
                done = basis[:, :found]
                rest = rest - done @ (done.T @ rest)
        if rest.norm() > floor:
            basis[:, found] = rest / rest.norm()
            found += 1
    return basis[:, :found].clone()


def project_out(matrix: Tensor, basis: Tensor) -> Tensor:
    """``(I - M M^T) matrix``: the part of ``matrix``'s columns orthogonal to the orthonormal columns of ``M``."""
    if basis.shape[1] == 0:
        return matrix
    basis = basis.to(matrix.dtype)
    return matrix - basis @ (basis.T @ matrix)


def project_rows_out(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows (I - M M^T)``: rows (e.g. of a LoRA down-projection or its gradient) kept out of span(M)."""
    return project_out(rows.T, basis).T


def top_directions(covariance: Tensor, rank: int) -> Tensor:
    """The ``rank`` leading eigenvectors (columns) of a symmetric PSD matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvectors[:, eigenvalues.argsort(descending=True)[:rank]]


MEMORY_RULES = ("gpm", "inflora")


def expand_memory(
    basis: Tensor, covariance: Tensor, threshold: float, rule: str = "gpm", first_task: bool = False
) -> Tensor:
    """The memory update of GPM (``rule='gpm'``) or of InfLoRA's official code (``'inflora'``) from a task's
    input second moment ``C``: keep span(M) and add leading directions of what M leaves of C.

    * ``gpm``: the directions are the eigenvectors of ``(I - MM^T) C (I - MM^T)``, a direction's energy its
      eigenvalue (the squared singular value of the inputs themselves, as GPM measures), out of trace(C).
    * ``inflora``: the directions are the left singular vectors of ``(I - MM^T) C``, a direction's energy its
      squared singular value (C's singular values squared: a sharper weighting), out of sum sigma(C)^2.

    Both official codes keep, on the first task (``first_task``), the directions whose cumulative energy ratio
    stays below ``threshold`` (``sum(cumsum(ratio) < threshold)``, possibly none), and on later tasks add
    directions while the share already captured is below ``threshold``. ``threshold = 1`` keeps every
    direction with energy (exact non-interference).
    """
    require_rule(rule)
    if rule == "inflora":
        directions, spread, _ = torch.linalg.svd(project_out(covariance, basis), full_matrices=False)
        energies, total = spread**2, (torch.linalg.svdvals(covariance) ** 2).sum()
    else:
        residual = project_out(project_out(covariance, basis).T, basis)
        eigenvalues, eigenvectors = torch.linalg.eigh((residual + residual.T) / 2)
        order = eigenvalues.argsort(descending=True)
        spread, directions = eigenvalues[order].clamp_min(0), eigenvectors[:, order]
        energies, total = spread, covariance.trace()
    if total <= 0:
        return basis
    ratios = (energies / total).tolist()
    # the directions the inputs use at all: the covariance's own scale (not its square) against its trace
    used = int((spread > 1e-12 * covariance.trace()).sum().item())
    if threshold >= 1:
        count = used
    elif first_task:
        count = int((torch.tensor(ratios).cumsum(0) < threshold).sum().item())
    else:
        captured, count = 1.0 - sum(ratios), 0
        while count < len(ratios) and captured < threshold:
            captured += ratios[count]
            count += 1
    count = min(count, used)
    return orthonormalize(torch.cat([basis.to(directions.dtype), directions[:, :count]], dim=1))


def require_rule(rule: str) -> None:
    if rule not in MEMORY_RULES:
        raise ConfigError(f"memory rule must be one of {MEMORY_RULES}, got {rule!r}")


def threshold_schedule(task: int, num_tasks: int, start: float, end: float) -> float:
    """InfLoRA's energy threshold for task ``task`` (0-based): linear from ``start`` to ``end``."""
    return start + (end - start) * task / max(num_tasks, 1)


def random_orthonormal(dim: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` orthonormal columns in R^dim, uniformly random (QR of a Gaussian), float64."""
    q, r = torch.linalg.qr(torch.randn(dim, count, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def minor_weight_directions(weight: Tensor, count: int) -> Tensor:
    """The right singular vectors of ``W`` with the smallest singular values (directions W barely uses)."""
    _, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=True)
    order = torch.cat([s.argsort(), torch.arange(len(s), vh.shape[0])]) if vh.shape[0] > len(s) else s.argsort()
    return vh[order[:count]].T


def interference_scores(candidates: Tensor, old: Tensor, new: Tensor, eps: float = 1e-12) -> Tensor:
    """Per candidate direction q: ``q^T C_old q / (q^T C_new q + eps)``, old tasks' input energy along q over
    the new task's. Low means a unit update along q disturbs old inputs little and reaches new ones well."""
    old_energy = ((old @ candidates) * candidates).sum(0)
    new_energy = ((new @ candidates) * candidates).sum(0)
    return old_energy / (new_energy + eps)


def sensitivity_scores(candidates: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """Per candidate direction q: ``E_old[(q^T x)^2] - E_new[(q^T x)^2]``, how much more a unit update along q
    moves the old tasks' outputs (mean second moment ``old``) than the new task's (``new``), both measured at
    the layer. Low means the direction reaches the new task's inputs and spares the old ones; unlike a ratio it
    does not favour directions that neither task uses."""
    return ((old - new) @ candidates * candidates).sum(0)


def contrast_directions(candidates: Tensor, old: Tensor, new: Tensor, rank: int) -> Tensor:
    """An orthonormal basis (``d x rank``) of the ``rank`` directions in span(candidates) with the most new-task
    input energy per unit of old-task energy: the leading generalized eigenvectors of ``q^T C_new q / (q^T C_old
    q + s)``, with ``s`` the new task's mean energy per candidate direction (so a direction no task uses scores
    low, and with no old tasks the answer is the new inputs' principal directions in the span). Unlike picking
    candidate columns, it may turn inside the span, so a random pool still yields data-aligned directions."""
    if rank > candidates.shape[1]:
        raise ValueError(f"cannot select {rank} directions from a pool of {candidates.shape[1]} free ones")
    new_in, old_in = candidates.T @ new @ candidates, candidates.T @ old @ candidates
    shift = (new_in.trace() / candidates.shape[1]).clamp_min(torch.finfo(new_in.dtype).tiny)
    factor = torch.linalg.cholesky(old_in + shift * torch.eye(len(old_in), dtype=old_in.dtype))
    whitened = torch.linalg.solve_triangular(factor, new_in, upper=False)
    whitened = torch.linalg.solve_triangular(factor, whitened.T, upper=False)  # L^-1 C_new L^-T, symmetric
    values, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    leading = vectors[:, values.argsort(descending=True)[:rank]]
    return ordered_basis(candidates @ torch.linalg.solve_triangular(factor.T, leading, upper=True))


def interference_ratio(b: Tensor, old: Tensor, new: Tensor, eps: float = 1e-12) -> Tensor:
    """``E_old||B A x||^2 / E_new||B A x||^2``: how far the update ``B A`` moves the old tasks' layer outputs per
    unit of movement of the new task's, from the inputs' second moments seen through the basis (``old = A C_old
    A^T`` and ``new = A C_new A^T``, both ``r x r``; no old data). Scale-free in ``B``; 0 at ``B = 0``."""
    return ((b @ old) * b).sum() / (((b @ new) * b).sum() + eps)


def select_lowest(scores: Tensor, count: int, tie_break: Tensor | None = None) -> Tensor:
    """Indices of the ``count`` lowest scores; equal scores go to the larger ``tie_break`` value first."""
    if count > len(scores):
        raise ValueError(f"cannot select {count} directions from a pool of {len(scores)} free ones")
    order = torch.argsort(-tie_break, stable=True) if tie_break is not None else torch.arange(len(scores))
    return order[torch.argsort(scores[order], stable=True)][:count]


def orthogonality_penalty(old: Tensor, new: Tensor, form: str = "abs") -> Tensor:
    """O-LoRA's penalty on the overlap of down-projection rows: ``sum |A_old A_new^T|`` (``'abs'``, the
    official code) or ``sum (A_old A_new^T)^2`` (``'squared'``, the paper). Zero when there is no old adapter."""
    overlap = old @ new.T
    return overlap.abs().sum() if form == "abs" else overlap.pow(2).sum()


def factored_svd(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` of ``B A`` (rank <= m for ``B: d x m``, ``A: m x k``) from QR factors, without forming ``B A``."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def compress_factors(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``B A`` with rank ``min(d, k, m)``: exact (up to rounding) and never wider than the layer."""
    if a.shape[0] <= min(a.shape[1], b.shape[0]):
        return a, b
    u, s, vh = factored_svd(a.double(), b.double())
    return vh.to(a.dtype), (u * s).to(b.dtype)
