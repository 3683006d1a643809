"""The plain-torch path: what an eager PEFT-style LoRA layer computes, op for op.

It is the path used wherever Triton is not (CPU, no Triton installed, ``kernel: torch``), the reference the
Triton kernels are tested against (it runs in any dtype, float64 included), and the baseline the benchmark
times eagerly and under ``torch.compile``. Its operations and their order are those of ``LoRALinear.forward``
before the kernels existed, so choosing this path changes no number.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


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
    """``x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ + x A_pastᵀ B_pastᵀ``.

    The slot (``lora_A``, ``lora_B``) may be None (switched off); the frozen stack (``past_A`` ``[R, d_in]``,
    ``past_B`` ``[d_out, R]``, each adapter's scale folded into its block of ``past_B``) may be None or empty.
    Dropout follows ``nn.Dropout``: active only when ``training``, and it touches the slot's input only.
    """
    y = F.linear(x, weight, bias)
    if lora_A is not None and lora_B is not None:
        dropped = F.dropout(x, dropout, training) if dropout > 0 else x
        y = y + (dropped @ lora_A.T @ lora_B.T) * scale
    if past_A is not None and past_B is not None and past_A.shape[0]:
        y = y + x @ past_A.T @ past_B.T
    return y
