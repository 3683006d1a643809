"""Wall time and final accuracy matrix of a `plan fit` run (by default the README's quickstart).

    python benchmarks/quickstart.py                                   # configs/quickstart.yaml
    python benchmarks/quickstart.py --config configs/continual/stacked_ci5x4.yaml -- --seed_everything 7

Everything after ``--`` goes to ``plan fit`` unchanged. Prints the wall time of the whole fit (model load,
tokenisation, training and validation of every task), the accuracy matrix and its summaries.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from plan.callbacks import ForgettingLogger
from plan.callbacks.forgetting import format_matrix
from plan.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("rest", nargs="*", help="extra `plan fit` arguments, after --")
    args = parser.parse_args()

    start = time.perf_counter()
    cli = run_cli(["fit", "--config", args.config, "--trainer.enable_progress_bar", "false", *args.rest])
    wall = time.perf_counter() - start

    logger = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ForgettingLogger))
    print(f"\nconfig: {args.config} {' '.join(args.rest)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"wall time of the fit: {wall:.0f} s ({wall / 60:.1f} min)")
    print(format_matrix(logger.matrix))
    for name, value in logger.summary().as_dict().items():
        print(f"{name:>12}: " + ("n/a" if math.isnan(value) else f"{value:.4f}"))


if __name__ == "__main__":
    main()
