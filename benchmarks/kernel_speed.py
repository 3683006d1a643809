"""Forward + backward of one LoRA linear layer on a GPU: the fused Triton kernels against the PEFT-style eager
layer and against ``torch.compile`` of that eager reference, measured in one run.

The layer is ``y = x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ`` with W frozen and x, A, B trainable (a layer in the middle
of a network). A step is the forward plus ``y.backward(dy)``, timed with ``triton.testing.do_bench`` (median,
gradients reset between runs). For every shape the script prints each variant's time, the fused layer's
speedup over eager and over compile, its achieved bandwidth (the layer's compulsory bytes, as in
``shared/specs/kernels.md`` section 4 K1, over its time) and that bandwidth's share of the copy bandwidth
measured at the start of the run (a device-to-device copy of 1 GiB, bytes read plus written), its TFLOP/s and
their share of the datasheet's dense peak, and the peak memory of each variant. Before anything is timed, the
outputs and the gradients of x, A and B of both the fused and the eager layer are compared with an fp32
reference on the same operands (``rel.err``: the fused layer's largest normwise error; ``eager err``: eager's
own rounding in the same dtype, the scale to judge it by). The issue's rule: a kernel stays only if it beats
``torch.compile`` by 10 % or more; the last column says whether each shape meets it.

Usage::

    python benchmarks/kernel_speed.py                                  # hidden 768/4096 x rank 8/16/64 x tokens 4k/16k/64k, bf16
    python benchmarks/kernel_speed.py --json benchmarks/kernels_gpu.json
    python benchmarks/kernel_speed.py --hidden 768 --ranks 16 --tokens 16384 --dropout 0.0 0.05 --compile-mode default
    python benchmarks/kernel_speed.py --smoke                          # no GPU: a tiny shape under TRITON_INTERPRET=1

Without a CUDA device the script refuses (exit status 2) rather than print CPU numbers; ``--smoke`` runs a
tiny shape through the same code under the Triton interpreter to check the script itself, and its timings
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# (device-name substring, dense bf16 tensor-core FLOP/s), first match wins; vendor datasheet figures.
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]
KEEP_RATIO = 1.10  # the rule: fused must be at least 10 % faster than torch.compile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 4096], help="square layer widths d_in = d_out")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument(
        "--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode of the baseline"
    )
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time in ms")
    parser.add_argument("--json", default=None, help="also write every record to this file")
    parser.add_argument("--smoke", action="store_true", help="CPU check of the script under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.ranks, args.tokens, args.dtype, args.dropout = [64], [8], [96], "fp32", [0.0, 0.1]
        args.compile_mode = "default"  # Inductor's CPU autotuning would only slow the check down
    return args


@dataclass
class Record:
    """One shape's measurements; times in ms, memory in MiB above the inputs."""

    hidden: int
    rank: int
    tokens: int
    dropout: float
    eager_ms: float
    compile_ms: float
    fused_ms: float
    speedup_vs_eager: float
    speedup_vs_compile: float
    fused_gbs: float
    fused_bw_share: float | None
    fused_tflops: float
    fused_flop_share: float | None
    eager_mib: float
    compile_mib: float
    fused_mib: float
    max_rel_error: float
    eager_rel_error: float
    keep: bool


def traffic(tokens: int, d: int, rank: int, elem: int) -> tuple[float, float]:
    """(compulsory bytes, FLOPs) of one forward + backward with W frozen: X read twice (forward, dA), Y written,
    dY read, dX written, W read twice, plus the adapters; FLOPs of the two GEMMs and the low-rank products."""
    activations = 3 * tokens * d + 2 * tokens * d + 2 * d * d
    adapters = 3 * 2 * rank * d + 2 * tokens * rank
    flops = 2 * (2 * tokens * d * d) + 6 * tokens * rank * (2 * d)
    return float(elem * (activations + adapters)), float(flops)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read plus written): the bandwidth a kernel can reach."""
    import torch
    import triton.testing

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() / (ms / 1e3)


def problem(hidden: int, rank: int, tokens: int, dtype, device) -> dict:
    """The layer's operands: W, b frozen; x, A, B trainable (B non-zero so the adapter matters); upstream dY."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, grad: bool = False):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_(grad)

    return {
        "x": rand(tokens, hidden, grad=True),
        "weight": rand(hidden, hidden, scale=hidden**-0.5),
        "bias": rand(hidden, scale=0.1),
        "lora_A": rand(rank, hidden, scale=hidden**-0.5, grad=True),
        "lora_B": rand(hidden, rank, scale=0.1, grad=True),
        "dy": rand(tokens, hidden),
    }


def steps(ops: dict, dropout: float, compile_mode: str) -> dict[str, Callable[[], None]]:
    """One forward + backward per variant, on the same operands."""
    import torch

    from plan.kernels import lora_linear, reference

    torch._dynamo.reset()  # a fresh compile per shape: dynamo's recompile limit would otherwise fall back to eager
    compiled = torch.compile(reference.stacked_lora_linear, mode=compile_mode, dynamic=False)
    args = (ops["x"], ops["weight"], ops["bias"], ops["lora_A"], ops["lora_B"], 2.0)
    return {
        "eager": lambda: lora_linear(*args, dropout=dropout, training=True, kernel="torch").backward(ops["dy"]),
        "compile": lambda: compiled(*args, None, None, dropout, True).backward(ops["dy"]),
        "fused": lambda: lora_linear(*args, dropout=dropout, training=True, kernel="triton").backward(ops["dy"]),
    }


def rel_errors(ops: dict) -> tuple[float, float]:
    """Largest normwise error of the output and the gradients of x, A and B against an fp32 reference on the
    same operands (no dropout, so the same function): (fused, eager in the benchmark's dtype)."""
    from plan.kernels import lora_linear

    trained = ("x", "lora_A", "lora_B")

    def run(operands: dict, kernel: str) -> list:
        for name in trained:
            operands[name].grad = None
        args = (operands[n] for n in ("x", "weight", "bias", "lora_A", "lora_B"))
        y = lora_linear(*args, 2.0, kernel=kernel)
        y.backward(operands["dy"])
        return [y.detach().float()] + [operands[n].grad.float() for n in trained]

    fp32 = {n: t.detach().float().requires_grad_(t.requires_grad) for n, t in ops.items()}
    reference = run(fp32, "torch")
    error = lambda got: max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(got, reference))
    return error(run(ops, "triton")), error(run(ops, "torch"))


def time_ms(step: Callable[[], None], ops: dict, args: argparse.Namespace) -> float:
    """Median time of one step: ``do_bench`` on a GPU, a wall-clock median under the interpreter (smoke)."""
    grads = [ops[t] for t in ("x", "lora_A", "lora_B")]
    if not args.smoke:
        import triton.testing

        return triton.testing.do_bench(step, args.warmup, args.rep, grad_to_none=grads, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        for t in grads:
            t.grad = None
    return statistics.median(times)


def peak_mib(step: Callable[[], None], ops: dict) -> float:
    """Peak CUDA memory of one step above what was allocated before it (NaN off the GPU)."""
    import torch

    if not torch.cuda.is_available():
        return math.nan
    for t in ("x", "lora_A", "lora_B"):
        ops[t].grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(
    hidden: int, rank: int, tokens: int, dropout: float, args: argparse.Namespace, copy_bw, peak_flops
) -> Record:
    """Check the fused and eager layers against fp32 on this shape, then time and measure every variant."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cpu" if args.smoke else "cuda"
    ops = problem(hidden, rank, tokens, dtype, device)
    error, eager_error = rel_errors(ops)
    variants = steps(ops, dropout, args.compile_mode)
    times = {name: time_ms(step, ops, args) for name, step in variants.items()}
    memory = {name: peak_mib(step, ops) for name, step in variants.items()}
    nbytes, flops = traffic(tokens, hidden, rank, torch.finfo(dtype).bits // 8)
    fused_s = times["fused"] / 1e3
    return Record(
        hidden=hidden,
        rank=rank,
        tokens=tokens,
        dropout=dropout,
        eager_ms=times["eager"],
        compile_ms=times["compile"],
        fused_ms=times["fused"],
        speedup_vs_eager=times["eager"] / times["fused"],
        speedup_vs_compile=times["compile"] / times["fused"],
        fused_gbs=nbytes / fused_s / 1e9,
        fused_bw_share=nbytes / fused_s / copy_bw if copy_bw else None,
        fused_tflops=flops / fused_s / 1e12,
        fused_flop_share=flops / fused_s / peak_flops if peak_flops else None,
        eager_mib=memory["eager"],
        compile_mib=memory["compile"],
        fused_mib=memory["fused"],
        max_rel_error=error,
        eager_rel_error=eager_error,
        keep=times["compile"] / times["fused"] >= KEEP_RATIO,
    )


def share(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def row(r: Record) -> str:
    """One line of the printed table."""
    times = f"{r.eager_ms:8.3f} {r.compile_ms:8.3f} {r.fused_ms:8.3f}   "
    speedups = f"{r.speedup_vs_eager:7.2f}x {r.speedup_vs_compile:7.2f}x"
    rates = f"{r.fused_gbs:7.0f} {share(r.fused_bw_share)} {r.fused_tflops:7.1f} {share(r.fused_flop_share)}"
    memory = f"{r.eager_mib:6.0f}/{r.compile_mib:6.0f}/{r.fused_mib:6.0f}"
    shape = f"{r.hidden:>6} {r.rank:>4} {r.tokens:>6} {r.dropout:>4}"
    return f"{shape} | {times} | {speedups} | {rates} | {memory} | {r.max_rel_error:7.1e} {r.eager_rel_error:9.1e} {'yes' if r.keep else 'no'}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "benchmarks/kernel_speed.py times GPU kernels and no CUDA device is visible, so it reports nothing here "
            "(CPU timings of Triton kernels would be interpreter timings). Run it on a GPU; "
            "`python benchmarks/kernel_speed.py --smoke` checks the script on the CPU.",
            file=sys.stderr,
        )
        return 2
    import triton

    name = "CPU, Triton interpreter (smoke run, no performance figures)" if args.smoke else torch.cuda.get_device_name()
    copy_bw = None if args.smoke else copy_bandwidth()
    peak_flops = None if args.smoke else next((f for key, f in PEAK_FLOPS if key in name), None)
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    print(f"device: {name}; {versions}, python {platform.python_version()}")
    copy_text = "n/a" if args.smoke else f"{copy_bw / 1e12:.2f} TB/s"
    print(
        f"dtype {args.dtype}; compile mode {args.compile_mode}; measured copy bandwidth {copy_text}; "
        f"a kernel stays if fused beats compile by {100 * (KEEP_RATIO - 1):.0f}% or more"
    )
    header = (
        f"{'hidden':>6} {'rank':>4} {'tokens':>6} {'p':>4} | {'eager':>8} {'compile':>8} {'fused':>8} ms | "
        f"{'vs eager':>8} {'vs comp':>8} | {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>7} {'%peak':>6} | "
        f"{'MiB eager/comp/fused':>20} | {'rel.err':>7} {'eager err':>9} keep"
    )
    print(header)
    records = []
    for hidden in args.hidden:
        for rank in args.ranks:
            for tokens in args.tokens:
                for dropout in args.dropout:
                    records.append(measure(hidden, rank, tokens, dropout, args, copy_bw, peak_flops))
                    print(row(records[-1]), flush=True)
    if args.smoke:
        print("smoke run done: the script works; its timings are interpreter timings and say nothing of the kernels")
    else:
        geo = math.exp(sum(math.log(r.speedup_vs_compile) for r in records) / len(records))
        kept = sum(r.keep for r in records)
        print(f"fused vs compile: geometric mean {geo:.2f}x; meets the 10% rule on {kept} of {len(records)} shapes")
    if args.json:
        run = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype}
        run |= {"copy_bandwidth_bytes_per_s": copy_bw}
        run |= {"compile_mode": args.compile_mode, "records": [asdict(r) for r in records]}
        with open(args.json, "w") as f:
            json.dump(run, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
