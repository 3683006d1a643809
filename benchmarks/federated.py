"""Federated LoRA on the embedded 20 Newsgroups + MiniLM: accuracy per rule, simulation overhead, memory, server time.

    python benchmarks/federated.py accuracy            # 5 rules + centralised, alpha 0.5 and 0.1, 3 seeds
    python benchmarks/federated.py accuracy --llm      # the same for SmolLM2 on Reuters R8, alpha 0.5 (about 60 min)
    python benchmarks/federated.py accuracy --domain --rules fedit lora_fair   # one domain per client (LoRA-FAIR)
    python benchmarks/federated.py cosine              # each round's global update vs the ideal, per rule
    python benchmarks/federated.py overhead            # a round's time / the same local steps run plainly
    python benchmarks/federated.py memory              # peak RSS and client-store bytes at 10 vs 100 clients
    python benchmarks/federated.py scale               # 10 / 100 / 1,000 clients, 10 per round: store, RSS, round time
    python benchmarks/federated.py server              # aggregation time per rule for 10 and 100 clients

``accuracy`` runs ``plan fit`` on ``configs/federated/<rule>.yaml`` (10 clients, 5 sampled per round, 5 rounds)
with the seed as ``seed_everything`` and partition seed and the Dirichlet alpha swapped in; one JSON line per
run goes to ``--out`` (runs already there are skipped, so an interrupted benchmark continues) and the table
gives the final global accuracy as mean +- std over seeds. ``accuracy --llm`` runs ``configs/llm/<rule>.yaml``
instead: federated instruction tuning of SmolLM2-135M-Instruct on Reuters R8 (6 clients, 2 sampled per round,
5 local steps each, 3 rounds; the centralised bound takes the same 30 steps on one client), scored by exact
match of the greedy answer. With the configs' alpha only (0.5) the 18 runs take about 60 minutes on 2 CPU cores:
a run is 30 training steps of about 5 s and 3 x 64 generated answers of about 0.2 s, about 3.3 minutes (FedIT
measured 3.6 minutes with other work on the cores; 18 such runs are 65). The results go to
``benchmarks/llm_federated.jsonl``. The other commands print their ratios directly.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lora_step import profiled_alloc_peak
from resumable import run_missing

from plan.aggregation import ClientUpdate, GlobalState, make_rule
from plan.callbacks import FederatedRounds
from plan.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "federated"
LLM_CONFIGS = ROOT / "configs" / "llm"  # the same rules' files for the language model (accuracy --llm)
RULES = ["fedit", "ffa_lora", "lora_fair", "flexlora", "flora"]
QUIET = [
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


def store_bytes(clients: dict[int, ClientUpdate]) -> int:
    """The bytes of the server's client store: every stored client's adapters and head."""
    adapters = sum(t.nbytes for u in clients.values() for pair in u.adapters.values() for t in pair)
    return adapters + sum(t.nbytes for u in clients.values() for t in u.head.values())


class RoundRecorder(Callback):
    """Global accuracy after each round, and the wall time of each round's training epoch (client switches and
    aggregation included) when it is the last callback before checkpointing."""

    def __init__(self) -> None:
        self.accuracy: list[float] = []
        self.cosine: list[float] = []
        self.error: list[float] = []
        self.epoch_s: list[float] = []
        self.start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_s.append(time.perf_counter() - self.start)
        if "val/acc" in trainer.callback_metrics:
            self.accuracy.append(float(trainer.callback_metrics["val/acc"]))
        server = next((cb.server for cb in trainer.callbacks if isinstance(cb, FederatedRounds)), None)
        if server is not None and server.last_round:
            self.cosine.append(server.last_round["cosine_to_ideal"])
            self.error.append(server.last_round["error_to_ideal"])


def fit(config: Path, *args: str) -> RoundRecorder:
    recorder = RoundRecorder()
    with tempfile.TemporaryDirectory() as root:
        cli = run_cli(["--config", str(config), *QUIET, "--trainer.default_root_dir", root, *args], run=False)
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder


# -- accuracy ---------------------------------------------------------------------------------------------


def accuracy_run(rule: str, alpha: float | None, seed: int, configs: Path = CONFIGS, domain: bool = False) -> dict:
    """One run; ``domain``: 20 Newsgroups' 4-domain split (label: comp / rec / sci / talk; domain: which
    sub-group of each), each client holding one domain only (``alpha`` None: no label skew inside it)."""
    args = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    if domain:
        args += ["--data.init_args.source.init_args.labels", "domain"]
    if rule != "centralised":
        args += ["--data.init_args.alpha", "null" if alpha is None else str(alpha)]
        args += ["--data.init_args.partition", "domain"] if domain else []
    start = time.perf_counter()
    recorder = fit(configs / f"{rule}.yaml", *args)
    return {
        "rule": rule,
        "alpha": alpha,
        "seed": seed,
        "acc": recorder.accuracy[-1],
        "curve": recorder.accuracy,
        "cosine_to_ideal": recorder.cosine,
        "wall_s": time.perf_counter() - start,
    }


def accuracy(args: argparse.Namespace) -> None:
    if args.domain and args.llm:
        raise SystemExit("--domain is the classifier's 20 Newsgroups split; it does not combine with --llm")
    configs = LLM_CONFIGS if args.llm else CONFIGS
    alphas: list[float | None] = [None] if args.domain else args.alphas or ([0.5] if args.llm else [0.5, 0.1])
    name = "llm_federated" if args.llm else "federated_domain" if args.domain else "federated"
    out = args.out or ROOT / "benchmarks" / f"{name}.jsonl"
    jobs = [("centralised", 0.0, s) for s in args.seeds] + [
        (r, a, s) for a in alphas for s in args.seeds for r in args.rules
    ]
    describe = lambda r: (
        f"{r['rule']} alpha {r['alpha']} seed {r['seed']}: acc {r['acc']:.3f} curve {[round(a, 3) for a in r['curve']]} ({r['wall_s']:.0f} s)"
    )
    run = functools.partial(accuracy_run, configs=configs, domain=args.domain)
    done = run_missing(out, jobs, ("rule", "alpha", "seed"), run, describe)
    central = [r["acc"] for r in done if r["rule"] == "centralised"]
    rounds = yaml.safe_load((configs / "fedit.yaml").read_text())["data"]["init_args"]["rounds"]
    print(f"\nfinal global accuracy after {rounds} rounds (mean +- std over seeds); centralised LoRA: {stat(central)}")
    print(f"{'rule':<12}" + "".join(f"{'alpha ' + str(a):>20}" for a in alphas))
    for rule in args.rules:
        cells = [stat([r["acc"] for r in done if r["rule"] == rule and r["alpha"] == a]) for a in alphas]
        print(f"{rule:<12}" + "".join(f"{c:>20}" for c in cells))
    print("\npaired difference to FedIT (same seed), mean +- std over seeds")
    for rule in (r for r in args.rules if r != "fedit"):
        cells = [stat(paired_differences(done, rule, "fedit", a)) for a in alphas]
        print(f"{rule:<12}" + "".join(f"{c:>20}" for c in cells))


def paired_differences(done: list[dict], rule: str, baseline: str, alpha: float | None) -> list[float]:
    by_seed = {(r["rule"], r["seed"]): r["acc"] for r in done if r["alpha"] == alpha}
    return [
        acc - by_seed[(baseline, seed)]
        for (name, seed), acc in by_seed.items()
        if name == rule and (baseline, seed) in by_seed
    ]


def stat(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}+-{spread:.3f} (n={len(values)})"


# -- cosine to the ideal update ---------------------------------------------------------------------------


def cosine(args: argparse.Namespace) -> None:
    """Per rule, how close each round's new global update is to ``s sum_k p_k B_k A_k`` (the driver's
    ``fed/cosine_to_ideal`` and ``fed/error_to_ideal``), on the accuracy benchmark's setting."""
    for rule in args.rules:
        recorder = fit(CONFIGS / f"{rule}.yaml", "--seed_everything", str(args.seed), "--data.init_args.seed", str(args.seed),
                       "--data.init_args.alpha", str(args.alpha), "--data.init_args.rounds", str(args.rounds))  # fmt: skip
        cosines = " ".join(f"{c:.4f}" for c in recorder.cosine)
        errors = " ".join(f"{e:.4f}" for e in recorder.error)
        print(f"{rule:<10} cosine per round: {cosines}   relative error: {errors}", flush=True)


# -- overhead ---------------------------------------------------------------------------------------------


def overhead(args: argparse.Namespace) -> None:
    """Each round's training epoch under the round driver against the same batches (same clients, same order,
    same model) trained plainly by Lightning with no client switches and no aggregation. No validation."""
    common = [
        "--data.init_args.rounds",
        str(args.rounds),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.max_epochs",
        str(args.rounds),
    ]
    plain = ["--trainer.callbacks", "[]"]
    times: dict[str, list[float]] = {"plain": []}
    for trial in range(args.trials):
        for rule in ["plain", *args.rules]:
            config = CONFIGS / f"{'fedit' if rule == 'plain' else rule}.yaml"
            recorder = fit(config, *common, *(plain if rule == "plain" else []))
            times.setdefault(rule, []).extend(recorder.epoch_s)
            print(f"trial {trial} {rule}: round times {[round(t, 2) for t in recorder.epoch_s]}", flush=True)
    # Rounds sample different clients, so compare totals over the same rounds, not medians of mixed rounds.
    # Each trial's rounds against the same trial's plain rounds: paired ratios, whose spread shows the noise.
    base = sum(times["plain"])
    per_trial = lambda rule: [sum(times[rule][i : i + args.rounds]) for i in range(0, len(times[rule]), args.rounds)]
    print(f"\nplain Lightning over the same batches: {base:.2f} s for {len(times['plain'])} rounds")
    for rule in args.rules:
        paired = [t / p for t, p in zip(per_trial(rule), per_trial("plain"))]
        print(
            f"{rule:<12} {sum(times[rule]):.2f} s   ratio to plain {sum(times[rule]) / base:.3f}   paired per trial: "
            f"median {statistics.median(paired):.3f} [{min(paired):.3f} - {max(paired):.3f}]"
        )


# -- memory -----------------------------------------------------------------------------------------------


def memory_child(clients: int, profiled: bool) -> None:
    """One round in which every client takes one local step of 4 examples (the same activations whatever the
    number of clients); prints the peak RSS and the bytes of the server's client store, or, ``profiled``, the
    peak of live tensor bytes during the fit (torch.profiler; no RSS, since the profiler's buffers would count)."""
    recorder_args = [
        "--data.init_args.num_clients", str(clients), "--data.init_args.clients_per_round", str(clients),
        "--data.init_args.partition", "iid", "--data.init_args.local_steps", "1", "--data.init_args.rounds", "1",
        "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        cli = run_cli(
            ["--config", str(CONFIGS / "fedit.yaml"), *QUIET, "--trainer.default_root_dir", root, *recorder_args],
            run=False,
        )
        if profiled:
            peak = profiled_alloc_peak(lambda: cli.trainer.fit(cli.model, datamodule=cli.datamodule))
        else:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    clients_stored = cli.trainer.callbacks[0].server.clients
    store = store_bytes(clients_stored)
    one = store // len(clients_stored)
    if profiled:
        print(json.dumps({"clients": clients, "live_tensor_peak_bytes": peak}))
        return
    print(json.dumps({"clients": clients, "stored": len(clients_stored), "store_bytes": store, "adapter_bytes": one,
                      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))  # fmt: skip


def memory(args: argparse.Namespace) -> None:
    rows = {}
    for clients in (10, 100):
        for flag in ([], ["--profiled"]):
            out = subprocess.run(
                [sys.executable, __file__, "memory-child", str(clients), *flag],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.setdefault(clients, {}).update(json.loads(out.strip().splitlines()[-1]))
        print(rows[clients], flush=True)
    one = rows[10]["adapter_bytes"]
    rss = rows[100]["max_rss_bytes"] - rows[10]["max_rss_bytes"]
    store = rows[100]["store_bytes"] - rows[10]["store_bytes"]
    print(f"\none client's adapter + head: {one / 2**20:.3f} MiB; 90 of them: {90 * one / 2**20:.2f} MiB")
    print(f"client store, 100 - 10 clients: {store / 2**20:.2f} MiB = {store / one:.1f} adapters")
    live = rows[100]["live_tensor_peak_bytes"] - rows[10]["live_tensor_peak_bytes"]
    print(f"peak live tensor bytes, 100 - 10 clients: {live / 2**20:.2f} MiB = {live / one:.1f} adapters")
    print(f"peak RSS, 100 - 10 clients: {rss / 2**20:.1f} MiB = {rss / one:.1f} adapters "
          f"(10 clients: {rows[10]['max_rss_bytes'] / 2**20:.0f} MiB, 100: {rows[100]['max_rss_bytes'] / 2**20:.0f} MiB)")  # fmt: skip


# -- scale: many clients, few of them per round ------------------------------------------------------------


class RoundClock(Callback):
    """Wall time of each round's training epoch (local training of its clients and the aggregation)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


def scale_child(clients: int) -> None:
    """4 rounds of 10 sampled clients (one local step of 4 examples each) among ``clients``, over the whole
    20 Newsgroups training split (1,000 per class is more than any group holds); prints the median round time
    of rounds 1-3, the client store and peak RSS."""
    arguments = [
        "--data.init_args.num_clients", str(clients), "--data.init_args.clients_per_round", "10",
        "--data.init_args.partition", "iid", "--data.init_args.local_steps", "1", "--data.init_args.rounds", "4",
        "--data.init_args.batch_size", "4", "--data.init_args.source.init_args.train_per_class", "1000",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    clock = RoundClock()
    with tempfile.TemporaryDirectory() as root:
        cli = run_cli(
            ["--config", str(CONFIGS / "fedit.yaml"), *QUIET, "--trainer.default_root_dir", root, *arguments], run=False
        )
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    clients_stored = cli.trainer.callbacks[0].server.clients
    store = store_bytes(clients_stored)
    print(json.dumps({"clients": clients, "trained": len(clients_stored), "store_bytes": store,
                      "round_s": statistics.median(clock.times[1:]), "rounds_s": clock.times,
                      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))  # fmt: skip


def scale(args: argparse.Namespace) -> None:
    rows = []
    for clients in (10, 100, 1000):
        out = subprocess.run(
            [sys.executable, __file__, "scale-child", str(clients)], capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    one = rows[0]["store_bytes"] / rows[0]["trained"]
    print()
    print(f"{'clients':>8} {'trained':>8} {'store MiB':>10} {'= adapters':>11} {'peak RSS MiB':>13} {'round s':>8}")
    for row in rows:
        print(
            f"{row['clients']:>8} {row['trained']:>8} {row['store_bytes'] / 2**20:>10.2f} {row['store_bytes'] / one:>11.1f} "
            f"{row['max_rss_bytes'] / 2**20:>13.0f} {row['round_s']:>8.2f}"
        )


# -- server -----------------------------------------------------------------------------------------------


def minilm_updates(clients: int, rank: int = 8, seed: int = 0) -> list[ClientUpdate]:
    """Random client uploads with MiniLM's shapes: 12 adapted 384 x 384 layers (query and value of 6 blocks)."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k in range(clients):
        adapters = {
            f"layer{i}": (torch.randn(rank, 384, generator=g) * 0.05, torch.randn(384, rank, generator=g) * 0.01)
            for i in range(12)
        }
        updates.append(
            ClientUpdate(k, 50 + k, adapters, {"weight": torch.randn(20, 384, generator=g), "bias": torch.zeros(20)})
        )
    return updates


def server(args: argparse.Namespace) -> None:
    print(
        f"aggregation time (median of {args.trials}) for MiniLM's 12 adapted layers, rank 8, torch threads {torch.get_num_threads()}"
    )
    for clients in (10, 100):
        updates = minilm_updates(clients)
        start_state = GlobalState(
            {n: (torch.zeros(8, 384), torch.zeros(384, 8)) for n in updates[0].adapters}, updates[0].head
        )
        line = []
        for rule in RULES:
            aggregate = make_rule(rule)
            if rule == "ffa_lora":
                shared = {n: a for n, (a, _) in updates[0].adapters.items()}
                current = GlobalState({n: (shared[n], torch.zeros(384, 8)) for n in shared}, start_state.head)
                clients_ = [
                    ClientUpdate(
                        u.client, u.num_samples, {n: (shared[n], b) for n, (_, b) in u.adapters.items()}, u.head
                    )
                    for u in updates
                ]
            else:
                current, clients_ = start_state, updates
            samples = []
            for _ in range(args.trials):
                start = time.perf_counter()
                aggregate.aggregate(clients_, current, 2.0, 8)
                samples.append(time.perf_counter() - start)
            line.append(f"{rule} {statistics.median(samples) * 1e3:.1f} ms")
        print(f"{clients:>4} clients: " + ", ".join(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("accuracy")
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--alphas", nargs="+", type=float, help="Dirichlet alphas (default 0.5 and 0.1; --llm: 0.5)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--llm", action="store_true", help="the language model: configs/llm/<rule>.yaml (SmolLM2, Reuters R8)"
    )
    p.add_argument(
        "--domain",
        action="store_true",
        help="feature non-IID as in LoRA-FAIR: one 20 Newsgroups domain per client (results: federated_domain.jsonl)",
    )
    p.add_argument("--out", type=Path, help="results (default benchmarks/federated.jsonl; --llm: llm_federated.jsonl)")
    p = sub.add_parser("cosine")
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("overhead")
    p.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trials", type=int, default=2)
    sub.add_parser("memory")
    sub.add_parser("scale")
    p = sub.add_parser("scale-child")
    p.add_argument("clients", type=int)
    p = sub.add_parser("memory-child")
    p.add_argument("clients", type=int)
    p.add_argument("--profiled", action="store_true")
    p = sub.add_parser("server")
    p.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # each run's LightningCLI takes its arguments from fit(), not from this command line
    if args.command == "memory-child":
        memory_child(args.clients, args.profiled)
    elif args.command == "scale-child":
        scale_child(args.clients)
    else:
        commands = {"accuracy": accuracy, "cosine": cosine, "overhead": overhead, "memory": memory, "scale": scale}
        {**commands, "server": server}[args.command](args)


if __name__ == "__main__":
    main()
