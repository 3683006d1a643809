"""plan.kernels: the dispatch, the torch path, and the Triton kernels checked against the plain-torch reference.

Three groups:

* default run (no Triton needed): the ``kernel`` setting is validated; ``auto`` on the CPU and ``torch`` give
  exactly what ``LoRALinear`` computed before the kernels existed; the path selection; an fp64 gradcheck of
  the torch path; the benchmark refuses to run without a GPU.
* slow, in this process: every kernel launch of a forward and backward is compiled for NVIDIA GPUs (sm_90,
  sm_80) without one, which catches what the interpreter accepts and the GPU backend does not; the
  benchmark's ``--smoke`` run.
* slow, under ``TRITON_INTERPRET=1``: the kernels run on the CPU and must match the reference in outputs and
  every gradient. ``TRITON_INTERPRET`` is read when triton is imported and must not reach other tests, so
  :func:`test_triton_kernels_under_the_interpreter` runs these tests in a child pytest process with the
  variable set; in this process they are skipped. To debug one directly:
  ``TRITON_INTERPRET=1 python -m pytest -m slow tests/test_kernels.py -k <name>``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from plan import kernels
from plan.kernels import reference
from plan.lora import LoRAConfig, LoRALinear, inject_lora

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = kernels.triton_installed()

needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child of test_triton_kernels_under_the_interpreter"
)


def layer(rank: int = 4, dropout: float = 0.0, kernel: str = "auto") -> LoRALinear:
    """A 24 -> 20 LoRA layer with random base weights and a clearly non-zero slot."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(24, 20), rank=rank, alpha=2.0 * rank, dropout=dropout, kernel=kernel)
    with torch.no_grad():
        lora.lora_B.normal_()
    return lora


def old_forward(lora: LoRALinear, x: Tensor) -> Tensor:
    """``LoRALinear.forward`` as written before the kernels: the formula the torch path must keep exactly."""
    y = lora.base_layer(x)
    if lora.slot_enabled:
        y = y + (lora.dropout(x) @ lora.lora_A.T @ lora.lora_B.T) * lora.scale
    if lora.past_rank:
        y = y + x @ lora.past_A.T @ lora.past_B.T
    return y


# ------------------------------------------------------------------------------ default run: dispatch


def test_kernel_setting_is_validated() -> None:
    """An unknown ``kernel`` is refused, naming the value and the choices, in the layer, the config and the
    dispatch function."""
    choices = "'auto', 'triton', 'torch'"
    with pytest.raises(ValueError, match=f"{choices}; got 'cuda'"):
        LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, kernel="cuda")
    with pytest.raises(ValueError, match=f"{choices}; got 'Triton'"):
        inject_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(rank=2, target_modules=["0"], kernel="Triton"))
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="got 'fast'"):
        kernels.lora_linear(x, torch.randn(8, 8), None, torch.randn(2, 8), torch.randn(8, 2), 1.0, kernel="fast")
    assert LoRAConfig().kernel == "auto" and "kernel=auto" in repr(layer())


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="Triton can run here")
def test_triton_setting_needs_a_machine_that_runs_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernel='triton'`` without a GPU (and without the interpreter) or without triton fails at construction."""
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, kernel="triton")
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, kernel="triton")


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize(
    ("slot", "stack", "train"),
    [(True, False, True), (True, True, True), (False, True, True), (True, True, False)],
    ids=["slot-train", "slot-stack-train", "stack-only-train", "slot-stack-eval"],
)
def test_torch_path_is_the_old_forward_bit_for_bit(kernel: str, slot: bool, stack: bool, train: bool) -> None:
    """On the CPU, ``auto`` and ``torch`` give exactly the output and gradients of the pre-kernel formula,
    dropout draws included (same RNG state, same mask)."""
    lora = layer(rank=4, dropout=0.3, kernel=kernel).train(train)
    if stack:
        lora.freeze_slot()
        with torch.no_grad():
            lora.lora_A.normal_()
    lora.slot_enabled = slot
    x = torch.randn(2, 5, 24, requires_grad=True)
    results = []
    for forward in (lora.forward, lambda inp: old_forward(lora, inp)):
        torch.manual_seed(11)
        y = forward(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad.clone(), lora.lora_A.grad, lora.lora_B.grad])
        x.grad = lora.lora_A.grad = lora.lora_B.grad = None
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def test_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why Triton is not taken, case by case; ``auto`` falls back, ``triton`` raises; a layer with no adapter
    at all is a plain linear whatever the setting."""
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    a, bb = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)

    def problem(*args, auto: bool = True) -> str | None:
        full = list(args) + [None] * (7 - len(args))
        return kernels.triton_problem(*full, auto=auto)

    if HAS_TRITON:
        assert "on cpu" in problem(x, w, b, a, bb)
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    assert "on cpu" in problem(x, w, b, a, bb)  # auto never takes Triton on the CPU, interpreter or not
    assert problem(x, w, b, a, bb, auto=False) is None
    assert "different dtypes" in problem(x, w.double(), b, a, bb, auto=False)
    assert problem(*(t.double() for t in (x, w, b, a, bb)), auto=False) is None  # fp64 only when forced
    assert "bf16" in problem(*(t.bfloat16() for t in (x, w, b, a, bb)), auto=False)
    assert "must not require grad" in problem(x, w.requires_grad_(), b, a, bb, auto=False)
    w.requires_grad_(False)
    assert "empty" in problem(x[:0], w, b, a, bb, auto=False)
    with pytest.raises(ValueError, match="kernel='triton' cannot run these inputs: .*different dtypes"):
        kernels.lora_linear(x, w.double(), b, a, bb, 1.0, kernel="triton")
    out = kernels.stacked_lora_linear(x, w, b, None, None, 1.0, torch.empty(0, 8), torch.empty(6, 0), kernel="triton")
    assert torch.equal(out, F.linear(x, w, b))
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    assert problem(x, w, b, a, bb) == "triton is not installed"


def test_gradcheck_torch_path() -> None:
    """fp64 gradcheck of the torch path (slot and frozen stack) for every trainable input."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, grad: bool = False) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)

    x, a, b = rand(3, 5, 7, grad=True), rand(2, 7, grad=True), rand(6, 2, grad=True)
    w, bias, pa, pb = rand(6, 7), rand(6), rand(3, 7), rand(6, 3)

    def fn(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return kernels.stacked_lora_linear(x, w, bias, a, b, 1.5, pa, pb, kernel="torch")

    assert torch.autograd.gradcheck(fn, (x, a, b))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_benchmark_refuses_without_a_gpu() -> None:
    """The benchmark prints no CPU figures: without CUDA it explains itself and exits with status 2."""
    child = subprocess.run([sys.executable, "benchmarks/kernel_speed.py"], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 2 and "no CUDA device" in child.stderr and "--smoke" in child.stderr
    assert child.stdout == ""


# -------------------------------------------------------------- slow: compile for GPUs, benchmark smoke

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def gpu_compile(kernel, args: dict, capability: int) -> None:
    """Compile one recorded launch for ``sm_<capability>`` as triton's launcher would: tensors and multiples of
    16 get the divisibility hints the JIT gives them, autotuned kernels their first config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    options = {}
    if isinstance(kernel, Autotuner):
        config = kernel.configs[0]
        args = {**args, **config.kwargs}
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        kernel = kernel.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = args[name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
        aligned = isinstance(value, Tensor) or (isinstance(value, int) and value % 16 == 0)
        if aligned and name not in kernel.do_not_specialize:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton, not in interpreter mode")
@pytest.mark.parametrize(
    ("dtype", "dropout", "stack", "frozen_a", "capability"),
    [
        (torch.bfloat16, 0.1, True, False, 90),
        (torch.float16, 0.0, False, True, 90),
        (torch.float32, 0.1, False, False, 90),
        (torch.bfloat16, 0.1, True, False, 80),
    ],
    ids=["bf16-dropout-stack-sm90", "fp16-frozen-A-sm90", "fp32-dropout-sm90", "bf16-dropout-stack-sm80"],
)
def test_kernels_compile_for_nvidia_gpus(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, dropout: float, stack: bool, frozen_a: bool, capability: int
) -> None:
    """Every launch of a forward and backward compiles for the GPU (the NVIDIA backend rejects what the
    interpreter accepts: 16-bit dots below 16, mixed-dtype dots, ...). Nothing runs: launches are recorded."""
    from plan.kernels import triton_lora

    launches = []
    monkeypatch.setattr(triton_lora, "_launch", lambda kernel, grid, **args: launches.append((kernel, args)))
    M, K, N, r = 160, 128, 96, 4  # rank 4: the rank tile must still be 16 wide for 16-bit dots
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    a, b = (
        torch.randn(r, K, dtype=dtype, requires_grad=not frozen_a),
        torch.randn(N, r, dtype=dtype, requires_grad=True),
    )
    past = (torch.randn(48, K, dtype=dtype), torch.randn(N, 48, dtype=dtype)) if stack else (None, None)
    w, bias = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    y = triton_lora.fused_lora_linear(x, w, bias, a, b, 2.0, *past, dropout, 7)
    y.backward(torch.ones_like(y))
    names = [getattr(kernel, "fn", kernel).__name__ for kernel, _ in launches]
    assert names == ["_shrink_kernel", "_forward_kernel", "_dy_kernel", "_dx_kernel"] + (
        [] if frozen_a else ["_da_kernel"]
    )
    for kernel, args in launches:
        gpu_compile(kernel, args, capability)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton; sets TRITON_INTERPRET itself")
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    """``benchmarks/kernel_speed.py --smoke`` runs every variant end to end under the interpreter, and the fused
    and eager layers agree with the fp32 reference (here fp32 too, so eager is the reference itself)."""
    out = tmp_path / "smoke.json"
    command = [sys.executable, "benchmarks/kernel_speed.py", "--smoke", "--json", str(out)]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, (child.stdout + child.stderr)[-4000:]
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 and all(r["max_rel_error"] < 1e-5 and r["eager_rel_error"] == 0 for r in records)
    assert "smoke run done" in child.stdout


# ------------------------------------------------------------------------------ slow: the interpreter


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETING, reason="this is the runner; its child is already interpreting")
def test_triton_kernels_under_the_interpreter() -> None:
    """Runs this file's interpreter tests in a child pytest with ``TRITON_INTERPRET=1`` and fails with its
    report if any of them fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "slow",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::UserWarning",
    ]
    command.append(__file__)
    child = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    report = child.stdout + child.stderr
    assert child.returncode == 0, report[-6000:]
    assert " passed" in report and " failed" not in report


@dataclass(frozen=True)
class Case:
    """A problem size: tokens (leading shape), d_in, d_out, slot rank (0: slot off), frozen stack rank."""

    lead: tuple[int, ...]
    d_in: int
    d_out: int
    rank: int
    past: int = 0
    bias: bool = True
    magnitude: float = 1.0


CASES = {
    "one-token": Case((1,), 23, 17, 1, bias=False),
    "odd": Case((67,), 130, 97, 8, magnitude=8.0),
    "batched-stack": Case((3, 13), 48, 80, 4, past=12),
    "wide-stack": Case((33,), 40, 36, 8, past=60),  # 68 adapter columns: two rank chunks, one of them mixed
    "stack-only": Case((21,), 36, 50, 0, past=10),
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}
OPERANDS = ("x", "weight", "bias", "lora_A", "lora_B")


def make(case: Case, dtype: torch.dtype, seed: int = 0, frozen_a: bool = False) -> dict[str, Tensor | None]:
    """Random operands (mixed signs) rounded to ``dtype``; the trainable ones require grad."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, grad: bool = False) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)

    K, N, r, R = case.d_in, case.d_out, case.rank, case.past
    return {
        "x": rand(*case.lead, K, scale=case.magnitude, grad=True),
        "weight": rand(N, K, scale=K**-0.5),
        "bias": rand(N) if case.bias else None,
        "lora_A": rand(r, K, scale=K**-0.5, grad=not frozen_a) if r else None,
        "lora_B": rand(N, r, grad=True) if r else None,
        "past_A": rand(R, K, scale=K**-0.5) if R else None,
        "past_B": rand(N, R, scale=0.5) if R else None,
    }


def fused(ops: dict, scale: float, p: float, seed: int) -> Tensor:
    """The fused layer on ``ops`` with dropout ``p`` under ``seed``."""
    from plan.kernels.triton_lora import fused_lora_linear

    return fused_lora_linear(*(ops[k] for k in OPERANDS), scale, ops["past_A"], ops["past_B"], p, seed)


def exact(ops: dict) -> dict:
    """fp64 copies of ``ops`` (new leaves, same requires_grad): the reference's operands."""
    return {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in ops.items()}


def mask_of(seed: int, case: Case, p: float) -> Tensor | None:
    """The dropout factor the kernels use for ``seed``, shaped like x (None without dropout)."""
    from plan.kernels.triton_lora import dropout_scale

    tokens = math.prod(case.lead)
    return dropout_scale(seed, tokens, case.d_in, p).double().view(*case.lead, case.d_in) if p else None


def masked_reference(ops: dict, scale: float, mask: Tensor | None) -> Tensor:
    """The torch reference, with a given dropout factor on the slot's input (``None``: no dropout)."""
    if mask is None:
        return reference.stacked_lora_linear(*(ops[k] for k in OPERANDS), scale, ops["past_A"], ops["past_B"])
    x = ops["x"]
    y = F.linear(x, ops["weight"], ops["bias"]) + scale * ((x * mask) @ ops["lora_A"].T @ ops["lora_B"].T)
    return y + x @ ops["past_A"].T @ ops["past_B"].T if ops["past_A"] is not None else y


def upstream(shape: torch.Size) -> Tensor:
    """The same upstream gradient for the fused layer and the reference."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(99))


def normwise_error(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_reference(name: str, dropout: float, dtype: torch.dtype) -> None:
    """Output and the gradients of x, A and B match the fp64 torch reference (same dropout mask), at odd
    sizes that cross every tile border."""
    case = CASES[name]
    ops = make(case, dtype)
    p = dropout if case.rank else 0.0
    y = fused(ops, 1.75, p, seed=1234)
    dy = upstream(y.shape).to(dtype)
    y.backward(dy)
    mask = mask_of(1234, case, p)
    if mask is not None:
        assert 0 < (mask == 0).sum() < mask.numel()
    ref = exact(ops)
    want = masked_reference(ref, 1.75, mask)
    want.backward(dy.double())
    trained = [k for k in ("x", "lora_A", "lora_B") if ops[k] is not None]
    assert all(ops[k].grad is not None for k in trained)
    errors = {"y": normwise_error(y, want)} | {k: normwise_error(ops[k].grad, ref[k].grad) for k in trained}
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.slow
@needs_interpreter
def test_frozen_a_gets_no_gradient_and_x_is_not_saved() -> None:
    """With A frozen (FFA-LoRA, InfLoRA, PLAN) no dA is computed and the input is not kept for backward; x and
    B still get exact gradients, and with x frozen as well the backward computes dB alone."""
    case = CASES["batched-stack"]
    for x_grad in (True, False):
        ops = make(case, torch.float32, frozen_a=True)
        ops["x"].requires_grad_(x_grad)
        y = fused(ops, 1.75, 0.25, seed=5)
        node = y.grad_fn.next_functions[0][0]
        assert type(node).__name__ == "FusedLoRALinearBackward"
        x_storage = ops["x"].untyped_storage().data_ptr()
        assert all(t is None or t.untyped_storage().data_ptr() != x_storage for t in node.saved_tensors)
        y.backward(upstream(y.shape))
        assert ops["lora_A"].grad is None and (ops["x"].grad is not None) == x_grad
        ref = exact(ops)
        masked_reference(ref, 1.75, mask_of(5, case, 0.25)).backward(upstream(y.shape).double())
        for k in ("x", "lora_B") if x_grad else ("lora_B",):
            assert normwise_error(ops[k].grad, ref[k].grad) < 1e-5, k


@pytest.mark.slow
@needs_interpreter
def test_forward_and_backward_apply_the_generated_mask() -> None:
    """An independent look at the mask: with W = 0, A = B = I and s = 1 the layer is ``y = D ⊙ x`` and, for
    dY = 1, ``dX = D``, so both expose the mask elementwise; it must be the one :func:`dropout_scale` writes
    for that seed (the forward and the backward each regenerate it)."""
    from plan.kernels.triton_lora import dropout_scale, fused_lora_linear

    M, d, p, seed = 37, 48, 0.4, 2024
    x = (torch.rand(M, d) + 0.5).requires_grad_()  # no zero input: y / x recovers the mask
    zero, eye = torch.zeros(d, d), torch.eye(d)
    y = fused_lora_linear(x, zero, None, eye, eye, 1.0, None, None, p, seed)
    y.backward(torch.ones_like(y))
    mask = dropout_scale(seed, M, d, p)
    assert torch.allclose(y / x.detach(), mask, rtol=1e-6, atol=0)
    assert torch.allclose(x.grad, mask, rtol=1e-6, atol=0)
    assert not torch.equal(
        fused_lora_linear(x.detach(), zero, None, eye, eye, 1.0, None, None, p, seed + 1), y.detach()
    )


@pytest.mark.slow
@needs_interpreter
def test_dropout_mask_statistics() -> None:
    """The keep rate is 1 - p within 4 standard deviations over ~1e5 elements, the kept elements carry
    1/(1-p), the same seed repeats the mask and another seed does not."""
    from plan.kernels.triton_lora import dropout_scale

    p, rows, cols = 0.1, 317, 331
    mask = dropout_scale(7, rows, cols, p)
    n = mask.numel()
    kept = (mask > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)
    assert torch.allclose(mask.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    assert torch.equal(mask, dropout_scale(7, rows, cols, p))
    assert (mask != dropout_scale(8, rows, cols, p)).double().mean() > 0.1
    # Neighbouring columns come from the same Philox draw: they must not be correlated.
    keep = (mask > 0).double()
    assert abs(torch.corrcoef(torch.stack([keep[:, :-1].flatten(), keep[:, 1:].flatten()]))[0, 1].item()) < 0.02


@pytest.mark.slow
@needs_interpreter
def test_gradcheck_fused_function_fp64() -> None:
    """fp64 gradcheck (fast mode) of the fused autograd Function with dropout (fixed seed), bias and a frozen
    stack, for x, A and B."""
    from plan.kernels.triton_lora import fused_lora_linear

    g = torch.Generator().manual_seed(3)
    x, a, b = (
        torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((9, 11), (3, 11), (7, 3))
    )
    w, bias = torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    pa, pb = torch.randn(2, 11, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)

    def fn(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return fused_lora_linear(x, w, bias, a, b, 1.5, pa, pb, 0.3, 77)

    assert torch.autograd.gradcheck(fn, (x, a, b), fast_mode=True)


@pytest.mark.slow
@needs_interpreter
def test_checkpoint_recompute_is_bitwise() -> None:
    """Under activation checkpointing the recomputed forward draws the same seed (the CPU generator is
    restored), so gradients equal those of a plain run bit for bit."""
    from torch.utils.checkpoint import checkpoint

    lora = layer(rank=4, dropout=0.3, kernel="triton").train()
    x = torch.randn(2, 9, 24, requires_grad=True)
    results = []
    for wrap in (lora, lambda inp: checkpoint(lora, inp, use_reentrant=False)):
        torch.manual_seed(5)
        y = wrap(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), x.grad.clone(), lora.lora_A.grad.clone(), lora.lora_B.grad.clone()])
        x.grad = lora.lora_A.grad = lora.lora_B.grad = None
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.slow
@needs_interpreter
def test_lora_layer_triton_path_matches_torch_path() -> None:
    """``LoRALinear(kernel='triton')`` on the CPU (interpreter) gives the torch path's output and gradients:
    first task, then with a frozen stack, then with the slot switched off; ``auto`` stays on torch."""
    fused, plain = layer(rank=4, kernel="triton"), layer(rank=4, kernel="torch")
    auto = layer(rank=4, kernel="auto")
    x = torch.randn(3, 7, 24)
    for step in ("first task", "stack", "slot off"):
        if step == "stack":
            for lora in (fused, plain, auto):
                lora.freeze_slot()
                with torch.no_grad():
                    lora.lora_A.mul_(-0.5)
        if step == "slot off":
            for lora in (fused, plain, auto):
                lora.slot_enabled = False
        outs = []
        for lora in (fused, plain, auto):
            xi = x.clone().requires_grad_()
            y = lora(xi)
            y.square().sum().backward()
            outs.append([y.detach(), xi.grad] + [t.grad for t in (lora.lora_A, lora.lora_B)])
            lora.zero_grad(set_to_none=True)
        for got, want, same in zip(outs[0], outs[1], outs[2]):
            assert (got is None) == (want is None), step
            if got is not None:
                assert normwise_error(got, want.double()) < 1e-5, step
                assert torch.equal(same, want), step


@pytest.mark.slow
@needs_interpreter
def test_autocast_runs_in_the_autocast_dtype() -> None:
    """Under autocast an fp32 layer runs the kernels in the autocast dtype, as ``F.linear`` does, and the fp32
    parameters get fp32 gradients close to the torch path's under the same autocast."""
    outs = []
    for kernel in ("triton", "torch"):
        lora = layer(rank=4, kernel=kernel)
        x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = lora(x)
        y.float().square().sum().backward()
        outs.append([y, x.grad, lora.lora_A.grad, lora.lora_B.grad])
    assert outs[0][0].dtype == outs[1][0].dtype == torch.float16
    for got, want in zip(*outs):
        assert got.dtype == want.dtype and normwise_error(got, want.double()) < 5e-3


@pytest.mark.slow
@needs_interpreter
def test_stack_of_one_adapter_equals_the_single_adapter() -> None:
    """The stacked kernel with only a frozen adapter ``(A, s B)`` equals the single-adapter kernel ``(A, B, s)``."""
    from plan.kernels.triton_lora import fused_lora_linear

    ops = make(CASES["odd"], torch.float32)
    x, w, bias, a, b = (ops[k].detach() for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    single = fused_lora_linear(x, w, bias, a, b, 1.75, None, None, 0.0, 0)
    stacked = fused_lora_linear(x, w, bias, None, None, 0.0, a, 1.75 * b, 0.0, 0)
    assert normwise_error(stacked, single.double()) < 1e-6


@pytest.mark.slow
@needs_interpreter
def test_rank_tiles_and_interpreter_limits() -> None:
    """Rank tiles are powers of two from 16 (the GPU's smallest 16-bit dot) to 64; bf16 is refused under
    the interpreter, whose bf16 dots are wrong, rather than computed silently wrong."""
    from plan.kernels.triton_lora import MAX_BLOCK_R, rank_block

    assert [rank_block(r) for r in (1, 8, 16, 17, 33, 64, 65, 300)] == [
        16,
        16,
        16,
        32,
        64,
        64,
        MAX_BLOCK_R,
        MAX_BLOCK_R,
    ]
    ops = make(CASES["odd"], torch.bfloat16)
    with pytest.raises(ValueError, match="bf16"):
        kernels.lora_linear(*(ops[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), 2.0, kernel="triton")
