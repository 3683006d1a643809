"""Triton kernels for the LoRA hot path, each beside a plain-torch path (see the kernels issue)."""
