"""What agrees between one process and DDP on two CPU processes (gloo), with every dropout off and on.

    python benchmarks/ddp_agreement.py

Runs the tests' tiny continual run (random-weight 2-layer BERT, synthetic data, 3 tasks, stacked LoRA) four
times in fresh processes: 1 and 2 processes, with LoRA's and the backbone's dropout at 0 and at 0.1. Prints,
for each dropout setting, the largest absolute difference of the final adapters and head between the process
counts (against the largest absolute value they hold) and the largest difference in the accuracy matrix.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import TINY_BERT, TinyRun

DROPOUT = {
    "model__init_args__backbone_config": {**TINY_BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "model__init_args__lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]},
}


def main() -> None:
    run = TinyRun(Path(tempfile.mkdtemp(prefix="plan-ddp-")))
    command = shutil.which("plan") or f"{sys.executable} -m plan.cli"

    def fit(name: str, **overrides) -> None:
        result = subprocess.run(
            [*command.split(), "fit", "--config", str(run.config(name, **overrides))], capture_output=True, text=True
        )
        if result.returncode:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")

    for label, overrides in (("dropout 0", {}), ("dropout 0.1", DROPOUT)):
        one, two = f"one-{label[-1]}", f"two-{label[-1]}"
        fit(one, **overrides)
        fit(two, trainer__strategy="ddp", trainer__devices=2, **overrides)
        a, b = run.last(one)["state_dict"], run.last(two)["state_dict"]
        weights = max((a[k] - b[k]).abs().max().item() for k in a if a[k].numel())
        largest = max(a[k].abs().max().item() for k in a if a[k].numel())
        matrix = (run.matrix(one) - run.matrix(two)).abs().nan_to_num().max().item()
        print(
            f"{label}: max |1 - 2 processes| adapters and head {weights:.3g} (values up to {largest:.3g}); accuracy matrix {matrix:.4f}"
        )


if __name__ == "__main__":
    main()
