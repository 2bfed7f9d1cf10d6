"""The quickstart notebooks run top to bottom on the tiny preset (shell/magic lines such as installs skipped)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

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


TPU_NOTEBOOK = NOTEBOOK.parent / "tpu_quickstart.ipynb"


def test_tpu_quickstart_notebook_runs(tmp_path, monkeypatch):
    """Mesh set-up, SP and CFG parallel on tiny-wan over the suite's 8 fake CPU devices."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTVIDEO_JAX_NOTEBOOK_MODEL", "tiny-wan")
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", os.environ.get("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache")))
    for name in ("FASTVIDEO_JAX_DISTRIBUTED", "FASTVIDEO_JAX_COORDINATOR", "FASTVIDEO_JAX_NUM_PROCESSES",
                 "FASTVIDEO_JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict = {"__name__": "__notebook__"}
    for i, source in enumerate(_code_cells(TPU_NOTEBOOK)):
        exec(compile(source, f"{TPU_NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    # tiny-wan has 2 heads: CFG on data=2, Ulysses on sequence=2, the rest fsdp.
    assert dict(namespace["mesh"].shape) == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}
    frames = namespace["frames"]
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    assert (tmp_path / "tpu_quickstart.mp4").stat().st_size > 0
    memory = {a.sharding.memory_kind for a in jax.tree.leaves(nnx.state(namespace["generator"].pipeline.text_encoder))}
    assert memory == {"pinned_host"}


I2V_NOTEBOOK = NOTEBOOK.parent / "image_to_video.ipynb"


def test_image_to_video_notebook_runs(tmp_path, monkeypatch):
    """The built-in tiny-wan-i2v pipeline: the painted first frame through CLIP, the VAE and the 36-channel DiT."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTVIDEO_JAX_NOTEBOOK_MODEL", raising=False)  # a CPU picks tiny-wan-i2v itself
    monkeypatch.delenv("FASTVIDEO_JAX_NOTEBOOK_IMAGE", raising=False)
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", os.environ.get("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache")))
    namespace: dict = {"__name__": "__notebook__"}
    for i, source in enumerate(_code_cells(I2V_NOTEBOOK)):
        exec(compile(source, f"{I2V_NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    assert namespace["MODEL"] == "tiny-wan-i2v"
    assert type(namespace["generator"].pipeline).__name__ == "WanImageToVideoPipeline"
    assert namespace["first_frame"].size == (832, 480)  # the full image went in, not the preview
    frames = namespace["frames"]
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    assert (tmp_path / "image_to_video.mp4").stat().st_size > 0


LORA_NOTEBOOK = NOTEBOOK.parent / "lora_finetune.ipynb"


def test_lora_finetune_notebook_runs(tmp_path, monkeypatch):
    """Toy clips made in the notebook -> preprocess -> adapter-only training -> generation with and without it."""
    from safetensors.numpy import load_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTVIDEO_JAX_NOTEBOOK_MODEL", raising=False)  # a CPU picks tiny-wan itself
    monkeypatch.setenv("FASTVIDEO_JAX_CACHE", os.environ.get("FASTVIDEO_JAX_CACHE", str(tmp_path / "cache")))
    namespace: dict = {"__name__": "__notebook__"}
    for i, source in enumerate(_code_cells(LORA_NOTEBOOK)):
        exec(compile(source, f"{LORA_NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    assert namespace["MODEL"] == "tiny-wan"
    assert len(namespace["losses"]) == namespace["STEPS"] == 20
    assert all(np.isfinite(namespace["losses"]))
    lora = load_file(tmp_path / "lora_demo" / "run" / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if ".lora_B." in k)  # trained: B starts at zero
    with_lora, without = namespace["with_lora"], namespace["without_lora"]
    assert with_lora.shape == without.shape == (5, 32, 32, 3)
    assert namespace["change"] > 0  # the adapter changes the video; set_lora(None) removed it
    assert (tmp_path / "lora_demo" / "with_lora.mp4").stat().st_size > 0
