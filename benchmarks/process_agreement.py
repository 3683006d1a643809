"""What agrees between one process and several: DDP and FSDP2 on two CPU processes (gloo), and two "nodes".

    python benchmarks/process_agreement.py ddp       # stacked LoRA, dropout 0 and 0.1
    python benchmarks/process_agreement.py fsdp2     # InfLoRA, PLAN (weight_minor pool), PLAN on a LM, FedIT
    python benchmarks/process_agreement.py nodes     # two nodes of one process on 127.0.0.1: continual, FedIT

Each case runs the tests' tiny runs (random-weight 2-layer BERT or Llama, synthetic data) through ``plan fit``
in fresh processes, once on one process and once on the layout named, and prints the largest absolute
difference of the final checkpoint's tensors (adapters, frozen stacks, head) against the largest value they
hold, and the largest difference of the accuracy matrix (continual) or of the round accuracies (federated).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import (
    TINY_BERT,
    TINY_FEDERATED_RUN,
    TINY_LM_RUN,
    TINY_RUN,
    TinyRun,
    fit_on_two_nodes,
    plan_in_processes,
)

TWO_PROCESSES = {"ddp": {"trainer__strategy": "ddp", "trainer__devices": 2}}
TWO_PROCESSES["fsdp2"] = {"trainer__strategy": "fsdp2", "trainer__devices": 2}
DROPOUT = {
    "model__init_args__backbone_config": {**TINY_BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "model__init_args__lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]},
}
FEDERATED_DROPOUT = {
    "model__init_args__backbone_config": TINY_BERT,
    "model__init_args__lora": {"rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["query", "value"]},
}


def subspace_method(method: str, **options) -> dict:
    """The tests' callbacks for a subspace method on stacked adapters (tests/test_fsdp.py)."""
    callbacks = [
        {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}},
        {"class_path": "plan.callbacks.ForgettingLogger"},
        {
            "class_path": f"plan.callbacks.{method}",
            "init_args": {"max_examples": 16, "threshold_start": 0.8, "threshold_end": 0.8, **options},
        },
    ]
    return {"trainer__callbacks": callbacks}


# name -> (base run, overrides for both runs)
CASES: dict[str, dict[str, tuple[dict, dict]]] = {
    "ddp": {"stacked LoRA, dropout 0": (TINY_RUN, {}), "stacked LoRA, dropout 0.1": (TINY_RUN, DROPOUT)},
    "fsdp2": {
        "InfLoRA": (TINY_RUN, subspace_method("InfLoRA")),
        "PLAN (weight_minor pool)": (TINY_RUN, subspace_method("PLAN", pool="weight_minor")),
        "PLAN on a language model": (TINY_LM_RUN, subspace_method("PLAN")),
        "FedIT": (TINY_FEDERATED_RUN, {}),
    },
    "nodes": {
        "stacked LoRA, dropout 0": (TINY_RUN, {}),
        "FedIT, LoRA dropout 0.2": (TINY_FEDERATED_RUN, FEDERATED_DROPOUT),
    },
}


def fit_one(config: Path) -> None:
    result = plan_in_processes("fit", "--config", str(config))
    if result.returncode:
        sys.exit(f"{config.stem} failed:\n{result.stderr[-3000:]}")


def compare(run: TinyRun, one: str, many: str) -> str:
    a, b = run.last(one), run.last(many)
    weights = max((a["state_dict"][k] - v).abs().max().item() for k, v in b["state_dict"].items() if v.numel())
    largest = max(v.abs().max().item() for v in a["state_dict"].values() if v.numel())
    if "FederatedRounds" in a["callbacks"]:
        accuracy = [[row["acc"] for row in c["callbacks"]["FederatedRounds"]["history"]] for c in (a, b)]
        scores = f"round accuracies {max(abs(x - y) for x, y in zip(*accuracy)):.4f}"
    else:
        scores = f"accuracy matrix {(run.matrix(one) - run.matrix(many)).abs().nan_to_num().max().item():.4f}"
    return f"max |1 - 2 processes| checkpoint tensors {weights:.3g} (values up to {largest:.3g}); {scores}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", choices=sorted(CASES))
    parser.add_argument("--only", help="run the cases whose label contains this text")
    args = parser.parse_args()
    launch: Callable[[Path], None] = fit_on_two_nodes if args.layout == "nodes" else fit_one
    for label, (base, overrides) in CASES[args.layout].items():
        if args.only and args.only not in label:
            continue
        run = TinyRun(Path(tempfile.mkdtemp(prefix=f"plan-{args.layout}-")), base)
        fit_one(run.config("one", **overrides))
        launch(run.config("many", **overrides, **TWO_PROCESSES.get(args.layout, {})))
        print(f"{args.layout} | {label}: {compare(run, 'one', 'many')}", flush=True)


if __name__ == "__main__":
    main()
