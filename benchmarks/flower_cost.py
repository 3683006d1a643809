"""plan's own federated simulation against Flower's simulation engine, and both against the floor.

    python benchmarks/flower_cost.py                       # 10 and 50 clients, 3 repetitions (about 30 min)
    python benchmarks/flower_cost.py --clients 10 --reps 1 --variants floor plan_ddp flower

The workload is ``configs/federated/fedit.yaml`` (MiniLM LoRA, 20 Newsgroups, Dirichlet 0.5, FedIT) with every
client sampled in every round, ``--local-steps`` steps each, no validation. The variants run the same local
steps on the same batches, each in a child process of its own, interleaved within every repetition:

* ``floor``: the same batches trained plainly by Lightning (no client switches, no aggregation);
* ``plan``: ``plan fit``'s simulation (``FederatedRounds``), one process, one model;
* ``plan_ddp``: the same simulation with the clients sharded over 2 DDP processes of 1 thread each
  (``--trainer.strategy ddp --trainer.devices 2``), the like-for-like match for Flower's two workers;
* ``flower``: ``python -m plan.flower simulate`` (Flower's simulation engine on Ray, one ``ClientApp`` worker
  per CPU, each holding its own model), the same round logic as ``plan``.

Per round: the wall time of a round (for ``floor`` and ``plan`` the training epoch, aggregation included; for
``flower`` from the server's first message to the end of the aggregation). Memory: the peak, sampled every
0.2 s, of the summed proportional set size (PSS: shared pages split between the processes that map them) of
the child and all its descendants (Ray's GCS, raylet and workers included). Start-up (imports, model and data
build, Ray start) is not in the round time; it is reported apart as the child's whole wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "federated" / "fedit.yaml"
VARIANTS = ("floor", "plan", "plan_ddp", "flower")


def workload(clients: int, rounds: int, local_steps: int, root: str) -> list[str]:
    """CLI overrides of the FedIT config: every client in every round, ``local_steps`` each, no validation."""
    return [
        "--config", str(CONFIG), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", root,
        "--data.init_args.num_clients", str(clients), "--data.init_args.clients_per_round", str(clients),
        "--data.init_args.rounds", str(rounds), "--trainer.max_epochs", str(rounds),
        "--data.init_args.local_steps", str(local_steps),
    ]  # fmt: skip


def child(variant: str, clients: int, rounds: int, local_steps: int) -> None:
    """One variant's run; prints its round times as JSON on the last line."""
    with tempfile.TemporaryDirectory() as root:
        if variant == "flower":
            print(json.dumps({"round_s": flower_rounds(clients, rounds, local_steps, root)}))
            return
        args = workload(clients, rounds, local_steps, root)
        from federated import RoundRecorder

        from plan.cli import run_cli

        extra = {
            "floor": ["--trainer.callbacks", "[]"],
            "plan_ddp": ["--trainer.strategy", "ddp", "--trainer.devices", "2"],
        }
        cli = run_cli([*args, *extra.get(variant, [])], run=False)
        recorder = RoundRecorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if cli.trainer.is_global_zero:  # under DDP every rank runs this; rank 0 speaks for the run
            print(json.dumps({"round_s": recorder.epoch_s}))


def flower_rounds(clients: int, rounds: int, local_steps: int, root: str) -> list[float]:
    """Flower's simulation of the workload (written as a YAML for its processes); the server's round times."""
    import yaml

    from plan import flower

    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(logger=False, limit_val_batches=0, max_epochs=rounds)
    config["data"]["init_args"].update(
        num_clients=clients, clients_per_round=clients, rounds=rounds, local_steps=local_steps
    )
    path = Path(root) / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    starts: dict[int, float] = {}
    times: list[float] = []
    configure, aggregate = flower.PlanStrategy.configure_train, flower.PlanStrategy.aggregate_train

    def timed_configure(self, server_round, *rest):
        starts[server_round] = time.perf_counter()
        return configure(self, server_round, *rest)

    def timed_aggregate(self, server_round, replies):
        result = aggregate(self, server_round, replies)
        times.append(time.perf_counter() - starts[server_round])
        return result

    flower.PlanStrategy.configure_train = timed_configure  # type: ignore[method-assign]
    flower.PlanStrategy.aggregate_train = timed_aggregate  # type: ignore[method-assign]
    flower.run_simulation(path, num_cpus=psutil.cpu_count(), cpus_per_client=1.0)
    return times


def measure(variant: str, clients: int, rounds: int, local_steps: int) -> dict:
    """Run one variant in a child process; its round times, peak summed PSS of its process tree, wall time."""
    command = [sys.executable, __file__, "child", variant, str(clients), str(rounds), str(local_steps)]
    start, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent)
        process = psutil.Process(job.pid)
        while job.poll() is None:
            peak = max(peak, tree_pss(process))
            time.sleep(0.2)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if job.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} with {clients} clients failed (exit {job.returncode})")
    result = json.loads(lines[-1])
    return {"variant": variant, "clients": clients, "round_s": statistics.median(result["round_s"]),
            "peak_pss_mib": peak / 2**20, "wall_s": time.perf_counter() - start}  # fmt: skip


def tree_pss(process: psutil.Process) -> int:
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += member.memory_full_info().pss
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="floor always runs")
    parser.add_argument("--out", type=Path, default=None, help="append every run as a JSON line")
    args = parser.parse_args()
    variants = ["floor", *(v for v in VARIANTS if v in args.variants and v != "floor")]
    rows = []
    for rep in range(args.reps):
        for clients in args.clients:
            for variant in variants:
                row = {"rep": rep, **measure(variant, clients, args.rounds, args.local_steps)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\n{'clients':>7} {'variant':>8} {'s/round':>16} {'x floor':>14} {'peak PSS MiB':>18} {'wall s':>7}")
    for clients in args.clients:
        by = {v: [r for r in rows if r["clients"] == clients and r["variant"] == v] for v in variants}
        ratios = {v: [r["round_s"] / f["round_s"] for r, f in zip(by[v], by["floor"])] for v in variants}
        for v in variants:
            print(f"{clients:>7} {v:>8} {spread([r['round_s'] for r in by[v]], '.2f'):>16} "
                  f"{spread(ratios[v], '.3f'):>14} {spread([r['peak_pss_mib'] for r in by[v]], '.0f'):>18} "
                  f"{statistics.median([r['wall_s'] for r in by[v]]):>7.0f}")  # fmt: skip


def spread(values: list[float], fmt: str) -> str:
    """The median and the range over repetitions."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], *map(int, sys.argv[3:6]))
    else:
        main()
