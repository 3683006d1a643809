"""Kernels for the LoRA hot path: one function per operation, each with a Triton path and a plain-torch path.

* :func:`lora_linear`: ``x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ`` with W frozen, fused forward and backward.
* :func:`stacked_lora_linear`: the same plus the frozen stack of finished adapters, applied together with
  the trainable slot as one concatenated low-rank product (how :class:`plan.lora.LoRALinear` runs).

``kernel`` picks the path:

* ``"torch"``: plain torch (:mod:`plan.kernels.reference`), on any device and dtype; exactly the operations of
  an eager PEFT-style layer.
* ``"triton"``: the fused Triton kernels (:mod:`plan.kernels.triton_lora`). Needs Triton and CUDA tensors, or
  ``TRITON_INTERPRET=1`` to run them on the CPU for testing; inputs the kernels do not handle raise.
* ``"auto"`` (default): Triton where it runs these inputs (CUDA, Triton installed, fp16/bf16/fp32, frozen base
  and stack), torch otherwise. On the CPU that is always torch, interpreter or not.

Triton is imported only when its path is taken, so CPU runs never load it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from . import reference

KERNELS = ("auto", "triton", "torch")


@functools.cache
def triton_installed() -> bool:
    """Whether the triton package is there (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET=1``, which triton reads when the
    kernels are defined, so it must be set before :mod:`plan.kernels.triton_lora` is first imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel(kernel: str) -> str:
    """Validate a ``kernel`` setting early (at layer construction): a known value, and for ``"triton"`` a
    machine where Triton can run (CUDA, or the interpreter)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}; got {kernel!r}")
    if kernel == "triton":
        if not triton_installed():
            raise RuntimeError(
                "kernel='triton' needs the triton package (pip install 'plan[triton]'); use kernel='auto' or 'torch'"
            )
        if not (torch.cuda.is_available() or interpreting()):
            raise RuntimeError(
                "kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels on the CPU for testing); "
                "use kernel='auto' to fall back to torch where no GPU is present"
            )
    return kernel


def triton_problem(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    past_A: Tensor | None,
    past_B: Tensor | None,
    *,
    auto: bool = True,
) -> str | None:
    """Why the Triton path cannot take these inputs, or None if it can. ``auto`` adds the preferences of
    ``kernel="auto"`` (CUDA only, the three training dtypes); the rest are hard limits of the kernels."""
    if not triton_installed():
        return "triton is not installed"
    if x.device.type != "cuda" and (auto or not interpreting()):
        return f"the input is on {x.device.type}; Triton runs on CUDA (on the CPU only under TRITON_INTERPRET=1)"
    tensors = [t for t in (x, weight, bias, lora_A, lora_B, past_A, past_B) if t is not None]
    if any(t.device != x.device for t in tensors):
        return "the tensors are on different devices"
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if not autocast and any(t.dtype != dtype for t in tensors):
        return "the tensors have different dtypes"
    supported = (torch.float16, torch.bfloat16, torch.float32) + (() if auto else (torch.float64,))
    if dtype not in supported:
        return f"dtype {dtype} is not one of {supported}"
    if interpreting() and dtype == torch.bfloat16:
        return "the Triton interpreter computes bf16 dots wrongly (triton-lang/triton#11584)"
    if any(t is not None and t.requires_grad for t in (weight, bias, past_A, past_B)):
        return "the base weight, bias and frozen stack must not require grad (the fused backward has no dW)"
    if x.numel() == 0:
        return "the input is empty"
    return None


def stacked_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    scale: float,
    past_A: Tensor | None,
    past_B: Tensor | None,
    *,
    dropout: float = 0.0,
    training: bool = False,
    kernel: str = "auto",
) -> Tensor:
    """``x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ + x A_pastᵀ B_pastᵀ``, on the path ``kernel`` selects.

    ``lora_A [r, d_in]``/``lora_B [d_out, r]``: the trainable slot, or None when it is switched off.
    ``past_A [R, d_in]``/``past_B [d_out, R]``: the frozen stack, each adapter's scale folded into its block of
    ``past_B``; None or empty when there is none. Dropout (``nn.Dropout`` semantics: only when ``training``)
    touches the slot's input only. ``A`` may be frozen; then no ``dA`` is computed.
    """
    if _use_triton(kernel, x, weight, bias, lora_A, lora_B, past_A, past_B):
        from . import triton_lora

        return triton_lora.stacked_lora_linear(
            x, weight, bias, lora_A, lora_B, scale, past_A, past_B, dropout, training
        )
    return reference.stacked_lora_linear(x, weight, bias, lora_A, lora_B, scale, past_A, past_B, dropout, training)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    *,
    dropout: float = 0.0,
    training: bool = False,
    kernel: str = "auto",
) -> Tensor:
    """``x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ`` with W frozen: one adapter, no stack (see :func:`stacked_lora_linear`)."""
    return stacked_lora_linear(
        x, weight, bias, lora_A, lora_B, scale, None, None, dropout=dropout, training=training, kernel=kernel
    )


def _use_triton(
    kernel: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor | None,
    lora_B: Tensor | None,
    past_A: Tensor | None,
    past_B: Tensor | None,
) -> bool:
    """Whether ``kernel`` sends these inputs to Triton; ``"triton"`` with inputs it cannot take raises. With no
    adapter at all (slot off, empty stack) the layer is a plain linear and takes the torch path whatever the
    setting: there is nothing to fuse."""
    check_kernel(kernel)
    if kernel == "torch" or (lora_A is None and (past_A is None or past_A.shape[0] == 0)):
        return False
    problem = triton_problem(x, weight, bias, lora_A, lora_B, past_A, past_B, auto=kernel == "auto")
    if problem is not None and kernel == "triton":
        raise ValueError(f"kernel='triton' cannot run these inputs: {problem}")
    return problem is None


__all__ = [
    "KERNELS",
    "check_kernel",
    "interpreting",
    "lora_linear",
    "stacked_lora_linear",
    "triton_installed",
    "triton_problem",
]
