"""Export of a trained DiT as a Diffusers transformer folder (``config.json`` + safetensors), through the
loader's exporter (reverse name mapping, PyTorch layout). The fp32 master parameters are written, so nothing
trained is rounded away; the folder appears only once complete (written beside it, then renamed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["export_dit", "export_lora"]

WEIGHTS = "diffusion_pytorch_model.safetensors"


def export_dit(trainer: Any, state: Any, source_dir: str | Path, destination: str | Path) -> Path:
    """Write the DiT of ``state`` (``trainer.split`` merged with the fp32 masters) to ``destination``, with the
    config.json of ``source_dir`` (the transformer it was trained from). An existing folder is replaced."""
    from fastvideo_jax.models.loader.component_loader import export_component
    from fastvideo_jax.models.loader.safetensors_io import save_safetensors
    from fastvideo_jax.parallel.distributed import is_primary

    destination = Path(destination)
    model = trainer.split.merge(state.params, cast=False)
    tensors = export_component(model)  # every process gathers (collective), one writes
    if not is_primary():
        return destination
    tmp = destination.with_name(destination.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((Path(source_dir) / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
    if destination.exists():
        old = destination.with_name(destination.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        destination.rename(old)
        tmp.rename(destination)
        shutil.rmtree(old)
    else:
        tmp.rename(destination)
    return destination


def export_lora(trainer: Any, state: Any, destination: str | Path) -> Path:
    """Write the LoRA adapters of ``state`` (fp32 masters) as a diffusers LoRA folder
    (``pytorch_lora_weights.safetensors``, which ``WanPipeline.load_lora_weights`` and ``--lora`` read)."""
    from fastvideo_jax.models.loader.lora_io import LORA_WEIGHT_NAME, save_lora
    from fastvideo_jax.parallel.distributed import is_primary

    destination = Path(destination)
    model = trainer.split.merge(state.params, cast=False)
    if not is_primary():
        return destination / LORA_WEIGHT_NAME
    return save_lora(model, destination)
