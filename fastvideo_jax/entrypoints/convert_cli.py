"""``fastvideo-jax convert SRC DST``: a Diffusers pipeline to orbax checkpoints, or back to Diffusers.

Every model component (DiT, text encoder, VAE) is loaded through our strict loaders and written either as
an orbax checkpoint (default; ``--dtype`` casts) or, with ``--to diffusers``, as safetensors through the
reverse name mapping. Tokenizers, schedulers and other folders are copied as they are.

Nothing is lost: output goes to a temporary directory beside DST and is renamed into place only when every
component succeeded; an existing DST is refused unless ``--overwrite``; SRC is only ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

__all__ = ["convert", "add_convert_arguments", "main"]


def _write_model(name: str, src: Path, dst: Path, to: str, dtype: str | None) -> None:
    from fastvideo_jax.models.loader import orbax_io
    from fastvideo_jax.models.loader.component_loader import export_component
    from fastvideo_jax.models.loader.pipeline_loader import MODEL_LOADERS
    from fastvideo_jax.models.loader.safetensors_io import save_safetensors

    import jax

    from fastvideo_jax.parallel.mesh import make_mesh

    # Conversion is host work: load onto the CPU so a model larger than one accelerator's memory converts.
    host = make_mesh(devices=jax.devices("cpu")[:1])
    model = MODEL_LOADERS[name]().load(src, precision=dtype or _source_precision(src), mesh=host)
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    if to == "orbax":
        from flax import nnx

        orbax_io.save_params(dst, nnx.state(model, nnx.Param), model.config.precision)
    else:
        weights = "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_safetensors(dst / weights, export_component(model), metadata={"format": "pt"})


def _source_precision(src: Path) -> str:
    """The precision a component is stored in: the marker's, or the commonest float dtype of its tensors."""
    from collections import Counter

    from fastvideo_jax.models.loader import orbax_io
    from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint

    if orbax_io.is_converted(src):
        return orbax_io.read_marker(src)["precision"]
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp32"}
    counts = Counter(names[i.dtype.name] for i in SafetensorsCheckpoint.from_dir(src).values() if i.dtype.name in names)
    return counts.most_common(1)[0][0] if counts else "fp32"


def _write_index(src: Path, dst: Path, to: str, dtype: str | None) -> None:
    index = json.loads((src / "model_index.json").read_text())
    index.pop("_fastvideo_jax", None)
    if to == "orbax":
        index["_fastvideo_jax"] = {"format": "orbax", "dtype": dtype}
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "orbax", dtype: str | None = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the pipeline at SRC (directory or repo id) into DST; returns DST."""
    from fastvideo_jax.models.loader.pipeline_loader import component_kind, read_model_index, resolve_model_path

    if to not in ("orbax", "diffusers"):
        raise ValueError(f"--to must be 'orbax' or 'diffusers', got {to!r}")
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    src = resolve_model_path(src).absolute()
    if src == dst or dst in src.parents or src in dst.parents:
        raise ValueError(f"SRC {src} and DST {dst} must not contain each other")
    index = read_model_index(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        for name in tqdm(list(index), desc="converting", unit="component", disable=not progress):
            if not (src / name).is_dir():
                continue
            if component_kind(name) == "model":
                _write_model(name, src / name, tmp / name, to, dtype)
            else:
                shutil.copytree(src / name, tmp / name)
        _write_index(src, tmp, to, dtype)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _move_into_place(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        tmp.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Diffusers pipeline directory, converted directory, or Hugging Face repo id")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=["orbax", "diffusers"], default="orbax",
                   help="orbax: our fast-loading format (default); diffusers: safetensors with Diffusers names")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="parameter precision to store (default: the source's; norms and modulation tables "
                   "stay fp32 as in the original models)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only after success)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvideo-jax convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(p)
    return run_convert(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
