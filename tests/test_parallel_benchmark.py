"""Smoke runs of ``benchmarks/parallel.py`` (the AOT simulation of the sharded CFG denoise step) on its tiny cases,
Wan and StepVideo, on the 8 fake CPU devices: every row compiles and is recorded, and sequence parallelism
splits the step's FLOPs (per-device FLOPs near one device's / 8)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(monkeypatch, tmp_path, *argv) -> list[dict]:
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports _results as its sibling
    spec = importlib.util.spec_from_file_location("parallel_benchmark", BENCH / "parallel.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("FASTVIDEO_BENCH_RESULTS", str(results))
    assert module.main(list(argv)) == 0
    return [json.loads(line) for line in results.read_text().splitlines()]


@pytest.mark.parametrize("model,sp,case,max_ratio", [
    ("tiny", "2", "8 devices data=2,fsdp=2,sequence=2", 2.5),  # 2 heads, 192 tokens: overheads dominate
    ("stepvideo-tiny", "8", "8 devices sequence=8", 1.25),
])
def test_tiny_cases_compile_and_split(monkeypatch, tmp_path, model, sp, case, max_ratio):
    rows = _run(monkeypatch, tmp_path, "--model", model, "--devices", "8", "--sp", sp)
    assert [r["case"] for r in rows] == [case]
    row = rows[0]
    assert {"tflop_per_device", "argument_gib", "temp_gib"} <= set(row)  # (rounded to 0 at this size)
    assert 1.0 <= row["x_ideal"] <= max_ratio, row
