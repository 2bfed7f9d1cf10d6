"""The quickstart notebook runs top to bottom on the tiny preset (shell/magic lines such as installs skipped)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        cells.append("\n".join(l for l in lines if not l.lstrip().startswith(("!", "%"))))
    return cells


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTVIDEO_JAX_NOTEBOOK_MODEL", "tiny-wan")
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", os.environ.get("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache")))
    namespace: dict = {"__name__": "__notebook__"}
    for i, source in enumerate(_code_cells(NOTEBOOK)):
        exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    frames = namespace["frames"]
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    assert (tmp_path / "quickstart.mp4").stat().st_size > 0
