"""Turn the JSON lines written by the benchmarks (``FASTVIDEO_BENCH_RESULTS``) into markdown tables, one per
benchmark, ready for ``benchmarks/RESULTS.md``.

    python benchmarks/summarize.py results.jsonl > results.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def tables(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["benchmark"]].append(r)
    out = []
    for name, items in groups.items():
        cols = ["case"] + sorted({k for r in items for k in r} - {"benchmark", "case"}, key=_order)
        out.append(f"### {name}\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in items:
            out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


_FIRST = ["backend", "ours_ms", "peer_ms", "speedup", "tflops"]


def _order(key: str):
    return (_FIRST.index(key) if key in _FIRST else len(_FIRST), key)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(tables(rows))


if __name__ == "__main__":
    main()
