"""Benchmark figures as JSON lines, so one device run yields a markdown table (``benchmarks/summarize.py``), and
the environment benchmark children run in.

Each benchmark calls ``record(...)`` for each figure it prints; records go to the file named by
``FASTVIDEO_BENCH_RESULTS`` (nothing is written when it is unset).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a benchmark's child process: the repo root put before the inherited PYTHONPATH
    (which may carry packages the device run installed elsewhere), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, **extra, PYTHONPATH=path)


def record(benchmark: str, case: str, **fields) -> None:
    path = os.environ.get("FASTVIDEO_BENCH_RESULTS")
    if not path:
        return
    row = {"benchmark": benchmark, "case": case}
    row.update({k: v for k, v in fields.items() if v is not None})
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
