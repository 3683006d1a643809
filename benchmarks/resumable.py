"""Benchmarks that record one JSON line per finished run, so an interrupted benchmark continues where it stopped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def recorded(out: Path) -> list[dict]:
    """Every result ``out`` holds (none if it does not exist yet)."""
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def run_missing(
    out: Path, jobs: list[tuple], key: tuple[str, ...], run: Callable[..., dict], describe: Callable[[dict], str]
) -> list[dict]:
    """Run ``run(*job)`` for every job whose ``key`` fields are not yet in ``out``, appending each result as it
    finishes; return every recorded result, old and new."""
    done = recorded(out)
    finished = {tuple(row[k] for k in key) for row in done}
    for job in jobs:
        if tuple(job) in finished:
            continue
        result = run(*job)
        print(describe(result), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        done.append(result)
    return done
