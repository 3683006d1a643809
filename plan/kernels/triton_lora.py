"""Fused LoRA linear layer in Triton: forward and backward kernels and the autograd Function around them.

Notation (2-D after flattening the leading dimensions): tokens ``M``, ``d_in = K``, ``d_out = N``. The adapter
columns are the trainable slot's ``r`` followed by the frozen stack's ``R - r``, concatenated into one
low-rank product: ``A = [A_slot; A_past]`` (``R x K``), ``B = [B_slot, B_past]`` (``N x R``), with the column
scales ``c = (s, ..., s, 1, ..., 1)`` (each frozen adapter's own scale is folded into its block of ``B_past``).
Dropout (mask ``D``, scaled by ``1/(1-p)``) applies to the slot's input only. Then

    forward:   S  = [D(X) A_slotᵀ | X A_pastᵀ] ⊙ c                    (M x R, kept for dB)
               Y  = X Wᵀ + b + S Bᵀ
    backward:  G  = (dY B) ⊙ c,   dB_slot = dYᵀ S_slot                (one read of dY for both)
               dX = dY W + D ⊙ (G_slot A_slot) + G_past A_past
               dA_slot = G_slotᵀ D(X)                                (only if A trains; X saved only then)

Five kernels, W frozen throughout:

* ``_shrink_kernel``: ``S``, one extra read of X; the dropout mask is generated here from a seed;
* ``_forward_kernel``: the base GEMM whose accumulator starts at ``S Bᵀ``, bias in the epilogue, so the
  adapter output and the sum never make a round trip through memory;
* ``_dy_kernel``: ``G`` and ``dB`` from one read of dY;
* ``_dx_kernel``: the ``dY W`` GEMM whose accumulator starts at the rank-R term, masked by the regenerated mask;
* ``_da_kernel``: ``dA`` from one more read of X, mask regenerated again.

The mask is never stored: every kernel that needs it recomputes it from the seed and the element's position
with Philox (:func:`_dropout_scale`), so forward and backward agree by construction. Reductions over tokens
(``dA``, ``dB``) go through per-split partial sums (fp32; fp64 for fp64 inputs) added up by torch, never
atomics, so results are deterministic.

Only the GEMMs are autotuned (on GPUs). Under ``TRITON_INTERPRET=1`` every kernel uses small fixed tiles so
that CPU tests run quickly and odd shapes cross tile borders.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_BLOCK_R = 64
"""Widest rank tile; larger ranks (big frozen stacks) loop over rank chunks."""

_TILE = 32 if INTERPRET else 64
"""Token and feature tile of the skinny kernels (shrink, dY pass, dA)."""


def rank_block(rank: int) -> int:
    """Rank tile for ``rank`` adapter columns: a power of two, at least 16 because the NVIDIA backend
    compiles no 16-bit ``tl.dot`` with an inner size below 16 (the interpreter would accept it), at most
    :data:`MAX_BLOCK_R` to bound the accumulators' registers."""
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))


def _gemm_configs() -> list[triton.Config]:
    """Tile candidates for the two GEMMs: one small tile under the interpreter, a few standard ones to autotune on
    GPUs (those that do not fit a device's shared memory are skipped by the autotuner)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# ------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _dropout_scale(seed, rows, col0, n_cols, p, BLOCK: tl.constexpr):
    """``keep / (1 - p)`` for the elements ``rows x [col0, col0 + BLOCK)`` of an ``[*, n_cols]`` input.

    Element ``(i, j)`` takes uniform number ``j % 4`` of the Philox draw for counter ``(i, j // 4)`` under
    ``seed``: it depends on nothing else (not the tile), so every kernel regenerates the same mask. One Philox
    call serves four elements, which quarters the integer work and the registers it holds (``col0`` is a
    multiple of 4, as every tile start is)."""
    groups = col0 // 4 + tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, rows.to(tl.int64)[:, None] * tl.cdiv(n_cols, 4) + groups[None, :])
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (rows.shape[0], BLOCK))  # columns u0 u1 u2 u3 u0 ...
    return tl.where(u >= p, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, sweeping ``GROUP_M`` row tiles per column so that programs
    running together share their operand tiles in L2."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit(do_not_specialize=["seed"])
def _dropout_scale_kernel(out_ptr, M, K, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the mask factor of :func:`_dropout_scale` for an ``M x K`` input (see :func:`dropout_scale`)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    scale = _dropout_scale(seed, rows, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], scale, mask=(rows < M)[:, None] & (cols < K)[None, :]
    )


@triton.jit(do_not_specialize=["seed"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    s_ptr,
    M,
    K,
    R,
    R_SLOT,
    scale,
    p,
    seed,
    DROPOUT: tl.constexpr,
    PLAIN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """One token tile and rank chunk of ``S = [D(X) A_slotᵀ | X A_pastᵀ] ⊙ c``. With dropout and a frozen
    stack both products run over the same loaded X tile (the kernel is memory-bound, the second dot is free)
    and each column keeps the one it belongs to. ``PLAIN``: some column sees the undropped input."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < M, ranks < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    a_cols = a_ptr + ranks.to(tl.int64)[None, :] * K
    plain = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    dropped = tl.zeros((BLOCK_M, BLOCK_R), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_cols + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)  # Aᵀ tile
        if DROPOUT:
            x_dropped = (x * _dropout_scale(seed, rows, k0, K, p, BLOCK_K)).to(x.dtype)
            dropped = tl.dot(x_dropped, a, dropped, input_precision=PRECISION)
        if PLAIN:
            plain = tl.dot(x, a, plain, input_precision=PRECISION)
    slot = ranks < R_SLOT
    if DROPOUT:
        plain = tl.where(slot[None, :], dropped, plain)
    out = plain * tl.where(slot, scale, 1.0)[None, :]
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :]
    tl.store(s_ptrs, out.to(s_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One output tile of ``Y = S Bᵀ + X Wᵀ + b``: the rank-R expand starts the accumulator, then the base GEMM."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, out_ok = rows < M, outs < N
    rows64, outs64 = rows.to(tl.int64), outs.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        s = tl.load(s_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b = tl.load(b_ptr + outs64[None, :] * R + ranks[:, None], mask=rank_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(s, b, acc, input_precision=PRECISION)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(w_ptr + outs64[None, :] * K + cols[:, None], mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(ACC)[None, :]
    y_ptrs = y_ptr + rows64[:, None] * N + outs[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _dy_kernel(
    dy_ptr,
    b_ptr,
    s_ptr,
    g_ptr,
    db_ptr,
    M,
    N,
    R,
    R_SLOT,
    scale,
    tiles_per_split,
    NEED_G: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """One rank chunk of ``G = (dY B) ⊙ c`` and this split's partial ``dB = dYᵀ S`` from a single read of dY.

    The program owns a contiguous range of token tiles. Column tiles of dY are the outer loop, so the partial
    ``dB`` of a column tile stays in registers; ``G`` of the program's own rows (``M x R``, small) is
    accumulated in place across column tiles, with a barrier so that every thread sees the previous update.
    """
    split = tl.program_id(0)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    col_scale = tl.where(ranks < R_SLOT, scale, 1.0)
    first_row = split * tiles_per_split * BLOCK_M
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        out_ok = outs < N
        outs64 = outs.to(tl.int64)
        if NEED_G:
            b = tl.load(
                b_ptr + outs64[:, None] * R + ranks[None, :], mask=out_ok[:, None] & rank_ok[None, :], other=0.0
            )
        db = tl.zeros((BLOCK_N, BLOCK_R), ACC)
        for t in range(tiles_per_split):
            rows = first_row + t * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            dy = tl.load(
                dy_ptr + rows64[:, None] * N + outs[None, :], mask=row_ok[:, None] & out_ok[None, :], other=0.0
            )
            tile_mask = row_ok[:, None] & rank_ok[None, :]
            if NEED_DB:
                s = tl.load(s_ptr + rows64[:, None] * R + ranks[None, :], mask=tile_mask, other=0.0)
                db = tl.dot(tl.trans(dy), s, db, input_precision=PRECISION)
            if NEED_G:
                g_ptrs = g_ptr + rows64[:, None] * R + ranks[None, :]
                g = tl.load(g_ptrs, mask=tile_mask, other=0.0)
                g += tl.dot(dy, b, input_precision=PRECISION) * col_scale[None, :]
                tl.store(g_ptrs, g, mask=tile_mask)
                tl.debug_barrier()
        if NEED_DB:
            db_ptrs = db_ptr + split.to(tl.int64) * N * R_SLOT + outs64[:, None] * R_SLOT + ranks[None, :]
            tl.store(db_ptrs, db, mask=out_ok[:, None] & (ranks < R_SLOT)[None, :])


@triton.jit
def _rank_term(acc, g_ptr, a_ptr, rows, cols, M, K, R, start, stop, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + G[:, start:stop] A[start:stop, cols]`` for one token tile: part of the low-rank term of dX."""
    row_ok, col_ok = rows < M, cols < K
    for r0 in range(start, stop, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < stop
        g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :]
        a_ptrs = a_ptr + ranks.to(tl.int64)[:, None] * K + cols[None, :]
        g = tl.load(g_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(g.to(a.dtype), a, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["seed"])
def _dx_kernel(
    dy_ptr,
    w_ptr,
    g_ptr,
    a_ptr,
    dx_ptr,
    M,
    N,
    K,
    R,
    R_SLOT,
    p,
    seed,
    DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One tile of ``dX = D ⊙ (G_slot A_slot) + G_past A_past + dY W``. The tile names follow the GEMM, as in
    :func:`_forward_kernel`: ``BLOCK_N`` tiles the output columns (``d_in``), ``BLOCK_K`` the reduction
    (``d_out``). The slot's term comes first and is masked right away, then the stack's term and the base GEMM
    accumulate on top, so a single accumulator is live throughout."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < K
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    acc = _rank_term(acc, g_ptr, a_ptr, rows, cols, M, K, R, 0, R_SLOT, BLOCK_R, PRECISION)
    if DROPOUT:
        acc = acc * _dropout_scale(seed, rows, pid_n * BLOCK_N, K, p, BLOCK_N)
    acc = _rank_term(acc, g_ptr, a_ptr, rows, cols, M, K, R, R_SLOT, R, BLOCK_R, PRECISION)
    for k0 in range(0, N, BLOCK_K):
        outs = k0 + tl.arange(0, BLOCK_K)
        out_ok = outs < N
        dy = tl.load(dy_ptr + rows64[:, None] * N + outs[None, :], mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        w_ptrs = w_ptr + outs.to(tl.int64)[:, None] * K + cols[None, :]
        w = tl.load(w_ptrs, mask=out_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + rows64[:, None] * K + cols[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _da_kernel(
    x_ptr,
    g_ptr,
    da_ptr,
    M,
    K,
    R,
    R_SLOT,
    p,
    seed,
    tiles_per_split,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """This split's partial ``dA = G_slotᵀ D(X)`` for one column tile and rank chunk of ``A_slot``."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    col_ok, rank_ok = cols < K, ranks < R_SLOT
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_K), ACC)
    for t in range(tiles_per_split):
        rows = (split * tiles_per_split + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        g = tl.load(g_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DROPOUT:
            x = (x * _dropout_scale(seed, rows, tl.program_id(0) * BLOCK_K, K, p, BLOCK_K)).to(dtype)
        acc = tl.dot(tl.trans(g.to(dtype)), x, acc, input_precision=PRECISION)
    da_ptrs = da_ptr + split.to(tl.int64) * R_SLOT * K + ranks.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(da_ptrs, acc, mask=rank_ok[:, None] & col_ok[None, :])


# Tuned once per layer shape (and dtype): the token count varies little in training, the rank loop is short.
_forward_gemm = triton.autotune(configs=_gemm_configs(), key=["N", "K"])(_forward_kernel)
_dx_gemm = triton.autotune(configs=_gemm_configs(), key=["N", "K"])(_dx_kernel)


# ---------------------------------------------------------------------------------------------- host side


def _launch(kernel, grid, **kwargs) -> None:
    """Every kernel launch goes through here, so that a test can record the launches and compile them for GPU
    targets on a machine without one."""
    kernel[grid](**kwargs)


def _accumulator(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """Accumulator dtype (torch, triton): fp64 for fp64 operands (a dot of fp64 into fp32 is not defined), else fp32."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands round to TF32 only where torch allows it for its own matmuls."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _splits(tiles: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, token tiles per split) for a reduction over ``tiles`` token tiles when each split runs
    ``programs`` programs: enough splits to fill the device (a few under the interpreter, so tests cross
    split borders), no empty split, so that the partial sums stay few."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    per_split = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(target, programs))))
    return triton.cdiv(tiles, per_split), per_split


def dropout_scale(seed: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The factor (``0`` or ``1/(1-p)``) the fused kernels apply to each element of a ``rows x cols`` input for
    ``seed``: the mask they regenerate, written out so that tests can build a reference with the same mask."""
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    grid = (triton.cdiv(rows, _TILE), triton.cdiv(cols, _TILE))
    _launch(_dropout_scale_kernel, grid, out_ptr=out, M=rows, K=cols, p=p, seed=seed, BLOCK_M=_TILE, BLOCK_K=_TILE)
    return out


class FusedLoRALinear(torch.autograd.Function):
    """``Y = X Wᵀ + b + [D(X) A_slotᵀ | X A_pastᵀ] ⊙ c Bᵀ`` on 2-D contiguous inputs (see the module docstring).

    W, b and the frozen stack never get gradients. X is saved only when ``lora_A`` trains, W only when X needs
    a gradient; the dropout mask is never saved, only its seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, past_A, past_B, scale, p, seed):
        M, K = x.shape
        N = weight.shape[0]
        r_slot = 0 if lora_A is None else lora_A.shape[0]
        a_cat = torch.cat([t for t in (lora_A, past_A) if t is not None]).contiguous()
        b_cat = torch.cat([t for t in (lora_B, past_B) if t is not None], dim=1).contiguous()
        R = a_cat.shape[0]
        dropout = p > 0 and r_slot > 0
        block_r, precision, (_, acc) = rank_block(R), _precision(x.dtype), _accumulator(x.dtype)

        s = torch.empty(M, R, dtype=x.dtype, device=x.device)
        _launch(
            _shrink_kernel,
            (triton.cdiv(M, _TILE), triton.cdiv(R, block_r)),
            x_ptr=x,
            a_ptr=a_cat,
            s_ptr=s,
            M=M,
            K=K,
            R=R,
            R_SLOT=r_slot,
            scale=scale,
            p=p,
            seed=seed,
            DROPOUT=dropout,
            PLAIN=r_slot < R or not dropout,
            BLOCK_M=_TILE,
            BLOCK_K=_TILE,
            BLOCK_R=block_r,
            PRECISION=precision,
            ACC=acc,
        )
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        _launch(
            _forward_gemm,
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            x_ptr=x,
            w_ptr=weight,
            bias_ptr=bias,
            s_ptr=s,
            b_ptr=b_cat,
            y_ptr=y,
            M=M,
            N=N,
            K=K,
            R=R,
            HAS_BIAS=bias is not None,
            BLOCK_R=block_r,
            PRECISION=precision,
            ACC=acc,
        )
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ctx.save_for_backward(
            x if need_da else None,
            weight if need_dx else None,
            a_cat if need_dx else None,
            b_cat if need_dx or need_da else None,
            s if need_db else None,
        )
        ctx.shape, ctx.r_slot, ctx.scale, ctx.p, ctx.seed = (M, N, K, R), r_slot, scale, p if dropout else 0.0, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, a_cat, b_cat, s = ctx.saved_tensors
        (M, N, K, R), r_slot, p, seed = ctx.shape, ctx.r_slot, ctx.p, ctx.seed
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy = dy.contiguous()
        dtype, device = dy.dtype, dy.device
        block_r, precision, (acc_dtype, acc) = rank_block(R), _precision(dtype), _accumulator(dtype)
        dx = da = db = None
        need_g = need_dx or need_da

        g = torch.zeros(M, R, dtype=acc_dtype, device=device) if need_g else None
        if need_g or need_db:
            chunks = triton.cdiv(R if need_g else r_slot, block_r)
            splits, per_split = _splits(triton.cdiv(M, _TILE), chunks, device)
            db_part = torch.empty(splits, N, r_slot, dtype=acc_dtype, device=device) if need_db else None
            _launch(
                _dy_kernel,
                (splits, chunks),
                dy_ptr=dy,
                b_ptr=b_cat,
                s_ptr=s,
                g_ptr=g,
                db_ptr=db_part,
                M=M,
                N=N,
                R=R,
                R_SLOT=r_slot,
                scale=ctx.scale,
                tiles_per_split=per_split,
                NEED_G=need_g,
                NEED_DB=need_db,
                BLOCK_M=_TILE,
                BLOCK_N=_TILE,
                BLOCK_R=block_r,
                PRECISION=precision,
                ACC=acc,
            )
            if db_part is not None:
                db = db_part.sum(0).to(dtype)
        if need_dx:
            dx = torch.empty(M, K, dtype=dtype, device=device)
            _launch(
                _dx_gemm,
                lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
                dy_ptr=dy,
                w_ptr=weight,
                g_ptr=g,
                a_ptr=a_cat,
                dx_ptr=dx,
                M=M,
                N=N,
                K=K,
                R=R,
                R_SLOT=r_slot,
                p=p,
                seed=seed,
                DROPOUT=p > 0,
                BLOCK_R=block_r,
                PRECISION=precision,
                ACC=acc,
            )
        if need_da:
            tiles = (triton.cdiv(K, _TILE), triton.cdiv(r_slot, block_r))
            splits, per_split = _splits(triton.cdiv(M, _TILE), tiles[0] * tiles[1], device)
            da_part = torch.empty(splits, r_slot, K, dtype=acc_dtype, device=device)
            _launch(
                _da_kernel,
                (*tiles, splits),
                x_ptr=x,
                g_ptr=g,
                da_ptr=da_part,
                M=M,
                K=K,
                R=R,
                R_SLOT=r_slot,
                p=p,
                seed=seed,
                tiles_per_split=per_split,
                DROPOUT=p > 0,
                BLOCK_M=_TILE,
                BLOCK_K=_TILE,
                BLOCK_R=block_r,
                PRECISION=precision,
                ACC=acc,
            )
            da = da_part.sum(0).to(dtype)
        return dx, None, None, da, db, None, None, None, None, None


def fused_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    scale: float,
    past_A: Tensor | None,
    past_B: Tensor | None,
    p: float,
    seed: int,
) -> Tensor:
    """:class:`FusedLoRALinear` on any leading shape, with an explicit dropout seed (tests pass their own).

    All tensors share one dtype and device; ``p`` is the dropout probability actually applied (0 in eval).
    """
    _check_shapes(x, weight, bias, lora_A, lora_B, past_A, past_B)
    if past_A is not None and past_A.shape[0] == 0:
        past_A = past_B = None
    lead, K = x.shape[:-1], x.shape[-1]
    bias = None if bias is None else bias.contiguous()
    x2d = x.reshape(-1, K).contiguous()
    y = FusedLoRALinear.apply(
        x2d, weight.contiguous(), bias, lora_A, lora_B, past_A, past_B, float(scale), float(p), seed
    )
    return y.reshape(*lead, weight.shape[0])


@torch.compiler.disable  # launched eagerly: inside a torch.compile'd model this is a graph break, not a trace
def stacked_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    scale: float,
    past_A: Tensor | None = None,
    past_B: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """The Triton path of :func:`plan.kernels.stacked_lora_linear`, same arguments as the torch reference.

    Draws the dropout seed from torch's CPU generator (so ``torch.manual_seed`` and activation checkpointing,
    which restores that generator, replay the same mask); under autocast runs in the autocast dtype, as
    ``F.linear`` would; launches on the input's GPU whatever the current device is.
    """
    p = dropout if training and lora_A is not None else 0.0
    seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
    device = x.device
    operands: tuple[Tensor | None, ...] = (x, weight, bias, lora_A, lora_B, past_A, past_B)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        operands = tuple(None if t is None else t.to(dtype) for t in operands)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.autocast(device.type, enabled=False), on_device:
        x, weight, bias, lora_A, lora_B, past_A, past_B = operands  # type: ignore[assignment]
        return fused_lora_linear(x, weight, bias, lora_A, lora_B, scale, past_A, past_B, p, seed)


def _check_shapes(x, weight, bias, lora_A, lora_B, past_A, past_B) -> None:
    """Refuse mismatched operands with a message, rather than let a kernel read out of bounds."""
    N, K = weight.shape
    problems = []
    if x.shape[-1] != K:
        problems.append(f"x has {x.shape[-1]} features, weight expects {K}")
    if bias is not None and bias.shape != (N,):
        problems.append(f"bias shape {tuple(bias.shape)} != ({N},)")
    for name, a, b in (("lora", lora_A, lora_B), ("past", past_A, past_B)):
        if (a is None) != (b is None):
            problems.append(f"{name}_A and {name}_B must both be given or both be None")
        elif a is not None and (a.shape[1] != K or b.shape[0] != N or a.shape[0] != b.shape[1]):
            problems.append(f"{name}_A {tuple(a.shape)} and {name}_B {tuple(b.shape)} do not fit a {K} -> {N} layer")
    if lora_A is None and (past_A is None or past_A.shape[0] == 0):
        problems.append("no adapter to apply: the slot is off and the frozen stack is empty")
    if problems:
        raise ValueError("fused LoRA linear: " + "; ".join(problems))
