"""One LoRA training step: plan's ``inject_lora`` against PEFT's ``get_peft_model`` and against the frozen
model alone (the floor), on MiniLM or on the embedded SmolLM2-135M language model.

A step is forward + backward + ``AdamW.step()`` (fp32) on a batch of random token ids with a full attention
mask. ``--model minilm``: the loss is the mean of the squared mean-pooled ``last_hidden_state``; ``--model
smollm``: next-token cross-entropy over the whole sequence (:func:`plan.instructions.response_loss`), as
instruction tuning computes it. plan and PEFT adapt the model type's query and value projections with the
same rank, alpha and dropout, and run in train mode. The ``floor`` variant has no adapter: the frozen model's
forward and a backward pass that reaches the input embeddings (what any adapter's backward must traverse),
with no optimizer step; plan/floor is the whole cost of adapting.

Time: one process builds both models, runs warm-up steps, then times them interleaved over ``--trials`` trials
of ``--steps`` steps each (order AB, BA, AB, ...), and reports the median step time of each, the ratio of the
medians plan/PEFT, the median of the per-trial paired ratios and the ratio of the minima.

Peak memory: each variant runs in its own fresh subprocess (this script re-invoked with ``--variant``).
On CUDA the figure is ``torch.cuda.max_memory_allocated()`` minus the memory allocated once the model,
batch and optimizer exist. On CPU there is no allocator peak counter, so two figures are taken:

* ``alloc`` (the headline figure): the peak of live CPU tensor bytes above the post-load level over all the
  steps (warm-up included, so grads and AdamW's state count), summed from ``torch.profiler`` allocator events
  -- the CPU analogue of ``max_memory_allocated() - baseline``;
* ``rss``: ``ru_maxrss`` after all the steps minus the RSS after the model was loaded, in a separate process
  without the profiler (includes malloc caching and everything else the process touched; coarser).

Both processes import plan and peft before loading the model, so neither baseline lacks modules the other has.
The script refuses to time the two variants if they train different numbers of parameters, and records a
hash of plan/lora.py (warning if it changed on disk between the timing and the memory runs).

Usage::

    python benchmarks/lora_step.py                       # CPU, batch 16, seq len 128, rank 8
    python benchmarks/lora_step.py --device cuda --json  # same on a GPU, machine-readable
    python benchmarks/lora_step.py --model smollm --batch 8 --trials 8   # the embedded LLM
    python benchmarks/lora_step.py --device cuda --config .gpu/minilm/backbone_config.json  # random weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("plan", "peft", "floor")
TARGETS = {"minilm": ["query", "value"], "smollm": ["q_proj", "v_proj"]}


# --------------------------------------------------------------------------------------------- model setup


def build(variant: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model with LoRA on its query/value projections (or none, for the floor), in train mode, on
    ``args.device``."""
    from plan.models import EMBEDDED_SMOLLM, load_backbone, load_causal_lm

    torch.manual_seed(args.seed)
    config = json.loads(args.config.read_text()) if args.config else None  # random weights of these shapes
    if args.model == "smollm":
        model = load_causal_lm(EMBEDDED_SMOLLM, config)
    else:
        model = load_backbone(config=config)
    targets = TARGETS[args.model]
    if variant == "plan":
        from plan.lora import LoRAConfig, inject_lora

        inject_lora(
            model, LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=list(targets))
        )
    elif variant == "peft":
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(targets)
            ),
        )
    elif variant == "floor":
        model.requires_grad_(False)
        # The embeddings' output requires grad, so backward runs through every layer, as an adapter's must.
        model.get_input_embeddings().register_forward_hook(lambda _module, _args, out: out.requires_grad_())
    else:
        raise ValueError(f"unknown variant {variant!r}")
    model.to(args.device)
    model.train()
    return model


def make_batch(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size if hasattr(model, "config") else 30522
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids.to(args.device), "attention_mask": attention_mask.to(args.device)}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    output = model(**batch, use_cache=False) if hasattr(model, "generate") else model(**batch)
    if hasattr(output, "logits"):  # a causal LM: next-token cross-entropy over the sequence
        from plan.instructions import response_loss

        return response_loss(output.logits, batch["input_ids"])
    hidden = output.last_hidden_state  # (batch, seq, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled.pow(2).mean()


class Runner:
    """A model, its batch and its AdamW optimizer; ``step()`` runs one synchronised training step."""

    def __init__(self, variant: str, args: argparse.Namespace) -> None:
        self.variant = variant
        self.device = torch.device(args.device)
        self.model = build(variant, args)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.batch = make_batch(self.model, args)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3) if self.params else None  # the floor trains nothing

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        self.sync()
        t0 = time.perf_counter()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, self.batch)
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self.sync()
        return time.perf_counter() - t0


@torch.no_grad()
def check_equivalence(plan_runner: Runner, peft_runner: Runner) -> float:
    """Give both models the same non-zero adapters and compare eval-mode outputs: same computation?"""
    from plan.lora import lora_layers

    g = torch.Generator().manual_seed(1)
    plan_layers = lora_layers(plan_runner.model)
    peft_modules = dict(peft_runner.model.named_modules())
    for name, layer in plan_layers.items():
        a = torch.randn(layer.lora_A.shape, generator=g) * 0.05
        b = torch.randn(layer.lora_B.shape, generator=g) * 0.05
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
        peft_layer = peft_modules[f"base_model.model.{name}"]
        peft_layer.lora_A["default"].weight.copy_(a)
        peft_layer.lora_B["default"].weight.copy_(b)
    batch = {k: v[:2, :32] for k, v in plan_runner.batch.items()}
    outs = []
    for r in (plan_runner, peft_runner):
        r.model.eval()
        output = r.model(**batch)
        outs.append(output.logits if hasattr(output, "logits") else output.last_hidden_state)
        r.model.train()
    # put the slots back to the usual init (B = 0) so the timed runs start from a no-op adapter, as in training
    for name, layer in plan_layers.items():
        layer.lora_B.zero_()
        peft_modules[f"base_model.model.{name}"].lora_B["default"].weight.zero_()
    return (outs[0] - outs[1]).abs().max().item()


# ------------------------------------------------------------------------------------------------- memory


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def profiled_alloc_peak(work) -> int | None:
    """Peak of live CPU tensor bytes above the level at the start while ``work()`` runs under the profiler
    (from allocator [memory] events; the CPU analogue of ``max_memory_allocated`` - baseline)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            work()
        events = [
            (ev.start_ns(), ev.nbytes())
            for ev in prof.profiler.kineto_results.events()
            if ev.name() == "[memory]" and str(ev.device_type()).endswith("CPU")
        ]
    except Exception:
        return None
    if not events:
        return None
    events.sort()
    live = peak = 0
    for _, delta in events:  # frees of blocks allocated before the profiler started come in as negatives too
        live += delta
        peak = max(peak, live)
    return peak


def measure_memory(variant: str, args: argparse.Namespace) -> dict:
    """Runs in a fresh process: load one variant, run warm-up + measured steps, report its peak."""
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401 - import both libraries in both variants' processes, so neither RSS baseline

    import plan.lora  # noqa: F401 - lacks modules the other one loaded before it (lazy imports would count)

    runner = Runner(variant, args)
    out = {
        "variant": variant,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "trainable_params": runner.trainable,
        "lora_py_sha256_16": plan_fingerprint()["lora_py_sha256_16"],
    }
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup + args.steps):
            runner.step()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        out["method"] = "torch.cuda.max_memory_allocated - allocated after load"
        return out
    if args.mem_method == "alloc":  # every step under the profiler: the first ones create grads and AdamW state
        alloc = profiled_alloc_peak(lambda: [runner.step() for _ in range(args.warmup + args.steps)])
        out["alloc_peak_bytes"] = alloc
        out["method"] = "torch.profiler: peak live CPU tensor bytes above post-load level"
        return out
    rss_loaded = current_rss_bytes()  # no profiler in this process: its buffers would count in the RSS
    for _ in range(args.warmup + args.steps):
        runner.step()
    out["rss_after_load_bytes"] = rss_loaded
    out["rss_peak_delta_bytes"] = maxrss_bytes() - rss_loaded
    out["method"] = "ru_maxrss - RSS after load"
    return out


def memory_in_subprocess(variant: str, args: argparse.Namespace, method: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--variant", variant, "--mem-method", method,
        "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank),
        "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
        "--seed", str(args.seed), "--model", args.model, *(["--config", str(args.config)] if args.config else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {variant} ({method}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peak_memory(args: argparse.Namespace, log) -> dict:
    """Each variant in fresh subprocesses: on CUDA one (max_memory_allocated); on CPU one per method."""
    methods = ["cuda"] if args.device == "cuda" else ["alloc", "rss"]
    memory: dict = {v: {} for v in VARIANTS}
    for method in methods:
        for v in VARIANTS:
            r = memory_in_subprocess(v, args, method)
            memory[v].update({k: val for k, val in r.items() if k != "method"})
            memory[v].setdefault("methods", []).append(r["method"])
            log(
                f"  {v} ({r['method']}): {mib(r.get('peak_bytes', r.get('alloc_peak_bytes', r.get('rss_peak_delta_bytes'))))}"
            )
    for v in VARIANTS:
        m = memory[v]
        if v != "floor" and m["trainable_params"] != memory["plan"]["trainable_params"]:
            log(
                f"WARNING: {v} trains {m['trainable_params']:,} parameters in its memory run, plan {memory['plan']['trainable_params']:,}"
            )
        if args.device == "cpu":
            m["peak_bytes"] = (
                m["alloc_peak_bytes"] if m.get("alloc_peak_bytes") is not None else m["rss_peak_delta_bytes"]
            )
    p, q, f = (memory[v]["peak_bytes"] for v in VARIANTS)
    memory["ratio_plan_over_peft"] = p / q if q else None
    memory["ratio_plan_over_floor"] = p / f if f else None
    memory["primary_method"] = memory["plan"]["methods"][0]
    if args.device == "cpu":
        rp, rq = memory["plan"]["rss_peak_delta_bytes"], memory["peft"]["rss_peak_delta_bytes"]
        memory["rss_ratio_plan_over_peft"] = rp / rq if rq else None
    return memory


def plan_fingerprint() -> dict:
    """Which plan/lora.py was measured: its sha256 and the repo's git commit (+ whether lora.py is modified)."""
    import hashlib

    import plan.lora

    path = plan.lora.__file__
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out = {"lora_py": path, "lora_py_sha256_16": digest}
    try:
        root = os.path.dirname(os.path.dirname(path))
        git = lambda *a: subprocess.run(
            ["git", "-C", root, *a], capture_output=True, text=True, check=True
        ).stdout.strip()
        out["git_commit"] = git("rev-parse", "--short", "HEAD")
        out["lora_py_modified_vs_commit"] = bool(git("status", "--porcelain", "--", path))
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# --------------------------------------------------------------------------------------------------- time


def measure_time(args: argparse.Namespace, log) -> dict:
    runners = {v: Runner(v, args) for v in VARIANTS}
    diff = check_equivalence(runners["plan"], runners["peft"])
    log(f"equivalence check (same adapters, eval mode): max |plan - peft| = {diff:.2e}")
    log(f"trainable parameters: plan {runners['plan'].trainable:,}, peft {runners['peft'].trainable:,}")
    if runners["plan"].trainable != runners["peft"].trainable:
        raise SystemExit(
            "plan and PEFT train different numbers of parameters "
            f"({runners['plan'].trainable:,} vs {runners['peft'].trainable:,}): not the same workload, not timing it"
        )
    for v in VARIANTS:
        for _ in range(args.warmup):
            runners[v].step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    trial_medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for trial in range(args.trials):
        shift = trial % len(VARIANTS)  # each variant goes first, second, ... in turn, reversed every other round
        order = VARIANTS[shift:] + VARIANTS[:shift]
        order = order if (trial // len(VARIANTS)) % 2 == 0 else order[::-1]
        for v in order:
            ts = [runners[v].step() for _ in range(args.steps)]
            times[v].extend(ts)
            trial_medians[v].append(statistics.median(ts))
        log(
            f"trial {trial + 1}/{args.trials}: "
            + ", ".join(f"{v} {statistics.median(times[v][-args.steps :]) * 1e3:.1f} ms" for v in VARIANTS)
        )
    out = {"equivalence_max_abs_diff": diff, "trainable_params": {v: runners[v].trainable for v in VARIANTS}}
    for v in VARIANTS:
        ts = sorted(times[v])
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[v] = {
            "median_s": statistics.median(ts),
            "min_s": ts[0],
            "q1_s": q[0],
            "q3_s": q[2],
            "n_steps": len(ts),
            "trial_medians_s": trial_medians[v],
            "steps_s": times[v],  # in run order
        }
    # per-trial paired ratio: the variants of one trial ran back to back, so this cancels slow drifts
    for base in ("peft", "floor"):
        paired = [p / q for p, q in zip(trial_medians["plan"], trial_medians[base])]
        out[f"ratio_plan_over_{base}"] = out["plan"]["median_s"] / out[base]["median_s"]
        out[f"min_ratio_plan_over_{base}"] = out["plan"]["min_s"] / out[base]["min_s"]
        out[f"paired_trial_ratios_{base}"] = paired
        out[f"paired_ratio_median_{base}"] = statistics.median(paired)
    return out


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(TARGETS), default="minilm")
    p.add_argument(
        "--config",
        type=Path,
        help="a model config JSON (model_type plus its fields): random weights of those shapes instead of the "
        "embedded model's (benchmarks/gpu_check.sh carries the embedded models' configs, not their weights)",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per trial (and in the memory runs)")
    p.add_argument("--trials", type=int, default=16, help="interleaved trials (plan/peft alternate, ABBA order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: memory subprocess
    p.add_argument("--mem-method", choices=["alloc", "rss", "cuda"], default="rss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    return args


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:  # memory subprocess: one JSON line on stdout
        print(json.dumps(measure_memory(args.variant, args)))
        return

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        **plan_fingerprint(),
    }
    config = {
        k: getattr(args, k)
        for k in ("batch", "seq_len", "rank", "alpha", "dropout", "steps", "trials", "warmup", "seed")
    }
    config["model"], config["target_modules"] = args.model, TARGETS[args.model]
    log(f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; device {args.device} "
        f"({env['device_name']}), cpu_count {env['cpu_count']}, torch threads {env['threads']}")  # fmt: skip
    log(f"config: {config}")

    timing = measure_time(args, log)
    log(f"plan/lora.py sha256 {env['lora_py_sha256_16']} (git {env.get('git_commit')}, "
        f"modified vs commit: {env.get('lora_py_modified_vs_commit')})")  # fmt: skip
    memory = None
    if not args.no_memory:
        log("peak memory: fresh subprocesses, one per variant and method ...")
        memory = measure_peak_memory(args, log)

    if memory:
        hashes = {env["lora_py_sha256_16"]} | {memory[v]["lora_py_sha256_16"] for v in VARIANTS}
        memory["same_lora_py_as_timing"] = len(hashes) == 1
        if len(hashes) > 1:
            log("WARNING: plan/lora.py changed on disk during the benchmark; timing and memory runs saw different code")
    result = {"env": env, "config": config, "time": timing, "memory": memory}
    if args.json:
        print(json.dumps(result, indent=2))
        return

    print()
    print(f"{'variant':<8} {'median step':>12} {'q1..q3':>20} {'min':>10} {'trainable':>10} {'peak mem':>12}"
          + ("  rss delta" if args.device == "cpu" and memory else ""))  # fmt: skip
    for v in VARIANTS:
        t = timing[v]
        row = (f"{v:<8} {t['median_s'] * 1e3:>9.1f} ms {t['q1_s'] * 1e3:>8.1f}..{t['q3_s'] * 1e3:.1f} ms "
               f"{t['min_s'] * 1e3:>7.1f} ms {timing['trainable_params'][v]:>10,} "
               f"{mib(memory[v]['peak_bytes']) if memory else 'skipped':>12}")  # fmt: skip
        if args.device == "cpu" and memory:
            row += f"  {mib(memory[v]['rss_peak_delta_bytes'])}"
        print(row)
    print()
    for base in ("peft", "floor"):
        paired = timing[f"paired_trial_ratios_{base}"]
        print(f"time ratio plan/{base} = {timing[f'ratio_plan_over_{base}']:.3f}   (ratio of medians; "
              f"median of per-trial paired ratios {timing[f'paired_ratio_median_{base}']:.3f}, "
              f"range {min(paired):.3f}..{max(paired):.3f}; "
              f"ratio of minima {timing[f'min_ratio_plan_over_{base}']:.3f})")  # fmt: skip
    if memory:
        print(f"peak memory ratio plan/peft = {memory['ratio_plan_over_peft']:.3f}, plan/floor = "
              f"{memory['ratio_plan_over_floor']:.3f}   ({memory['primary_method']})")  # fmt: skip
        if args.device == "cpu":
            print(
                f"RSS peak-delta ratio plan/peft = {memory['rss_ratio_plan_over_peft']:.3f}   (ru_maxrss - RSS after load)"
            )


if __name__ == "__main__":
    main()
