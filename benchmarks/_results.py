"""Benchmark figures as JSON lines, so one device run yields a markdown table (``benchmarks/summarize.py``).

Each benchmark calls ``record(...)`` for each figure it prints; records go to the file named by
``FASTVIDEO_BENCH_RESULTS`` (nothing is written when it is unset).
"""

from __future__ import annotations

import json
import os


def record(benchmark: str, case: str, **fields) -> None:
    path = os.environ.get("FASTVIDEO_BENCH_RESULTS")
    if not path:
        return
    row = {"benchmark": benchmark, "case": case}
    row.update({k: v for k, v in fields.items() if v is not None})
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
