"""Kill-and-resume on a real config: how far a run killed with SIGKILL and resumed from its latest checkpoint
ends from the uninterrupted run (0.0 everywhere means bit-identical).

    python benchmarks/resume.py --config configs/quickstart.yaml --kill-at 45 --every 20 -- --trainer.max_epochs 2
    python benchmarks/resume.py --config configs/federated/fedit.yaml --kill-at 50 --every 20

Runs ``plan fit`` three times in fresh processes under ``--workdir``: uninterrupted; with a callback that
SIGKILLs the process when training step ``--kill-at`` is about to start (mid-task checkpoints every
``--every`` steps); and resumed from that run's ``last.ckpt``. Prints the largest absolute difference of the
final adapters and head, of the optimizer state, and of each callback's state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KILLER = """
import os, signal
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def max_difference(a: object, b: object) -> float:
    """Largest absolute difference between two nested checkpoint states (inf if their structure differs)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        if not a.numel():
            return 0.0
        return (a.double() - b.double()).nan_to_num().abs().max().item() + float(not torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return float("inf")
        return max((max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--kill-at", type=int, required=True, help="global step at which the second run is killed")
    parser.add_argument("--every", type=int, required=True, help="mid-task checkpoint interval, in steps")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("rest", nargs="*", help="extra `plan fit` arguments, after --")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="plan-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    command = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    common = [
        *command.split(),
        "fit",
        "--config",
        str(Path(args.config).resolve()),
        "--trainer.enable_progress_bar",
        "false",
    ]
    common += ["--step_checkpoint.every_n_train_steps", str(args.every), *args.rest]

    def fit(name: str, *extra: str) -> tuple[int, float]:
        start = time.perf_counter()
        out = [f"--trainer.logger.init_args.save_dir={work / name}", "--trainer.logger.init_args.version=run"]
        result = subprocess.run([*common, *out, *extra], capture_output=True, text=True, env=env, cwd=work)
        if result.returncode not in (0, -signal.SIGKILL):
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        return result.returncode, time.perf_counter() - start

    _, full_s = fit("full")
    code, killed_s = fit("part", "--trainer.callbacks+=killer.KillAtStep", f"--trainer.callbacks.step={args.kill_at}")
    assert code == -signal.SIGKILL, "the run ended before the kill step: choose a smaller --kill-at"
    (last,) = (work / "part").glob("*/run/checkpoints/last.ckpt")
    checkpoint = torch.load(last, weights_only=False)
    _, resumed_s = fit("part", "--ckpt_path", str(last))
    full, resumed = (
        torch.load(next((work / n).glob("*/run/checkpoints/last.ckpt")), weights_only=False) for n in ("full", "part")
    )
    print(
        f"config: {args.config} {' '.join(args.rest)}; killed at step {args.kill_at}, resumed from step {checkpoint['global_step']} (epoch {checkpoint['epoch']})"
    )
    print(f"wall time: uninterrupted {full_s:.0f} s, killed run {killed_s:.0f} s, resumed run {resumed_s:.0f} s")
    print(f"max |difference| adapters and head: {max_difference(resumed['state_dict'], full['state_dict']):.3g}")
    print(
        f"max |difference| optimizer state:   {max_difference(resumed['optimizer_states'], full['optimizer_states']):.3g}"
    )
    for key in sorted(full["callbacks"]):
        if not key.startswith(("ModelCheckpoint", "MidTaskCheckpoint", "RunSettings", "StageProgressBar")):
            print(
                f"max |difference| {key}: {max_difference(resumed['callbacks'].get(key), full['callbacks'][key]):.3g}"
            )


if __name__ == "__main__":
    main()
