"""``fastvideo-jax convert SRC DST``: a Diffusers pipeline to orbax checkpoints, or back to Diffusers.

Every model component (DiT, text encoder, VAE) is loaded through our strict loaders and written either as
an orbax checkpoint (default; ``--dtype`` casts) or, with ``--to diffusers``, as safetensors through the
reverse name mapping. Tokenizers, schedulers and other folders are copied as they are.

Nothing is lost. SRC is only ever read: a DST that is SRC, inside it or around it (however spelled: ``..``,
symlinks, bind mounts) is refused. Every check runs before any work: a folder model_index.json lists but SRC
lacks, a model that cannot be stored at ``--dtype`` (UMT5 refuses fp16), too little free space. Output goes
to ``.DST.partial-<pid>-*`` beside DST under a lock (``.DST.lock``, one run per DST) and is renamed into place
only when every component succeeded, never over anything it did not check; an existing DST is refused unless
``--overwrite``, which replaces only a pipeline (or empty) directory and keeps it until the new one is in
place. Ctrl-C, SIGTERM and a full disk remove the partial output; folders left by killed runs are removed by
the next run into the same DST.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fastvideo_jax.entrypoints.output_dir import (DirLock, check_separate, clean_stale, identity,
                                                  partial_prefix, publish, terminate_as_interrupt)
from fastvideo_jax.errors import CheckpointError, OutputPathError, UserError
from fastvideo_jax.utils.paths import give_ordinary_mode

__all__ = ["convert", "add_convert_arguments", "main"]


_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class _Component:
    name: str
    kind: str  # component_kind(): "model" is converted, everything else copied as it is
    precision: str | None  # models only: the precision written
    stored: str | None = None  # models only: the precision SRC holds (read once: it parses every shard's header)


def _write_model(name: str, src: Path, dst: Path, to: str, precision: str) -> None:
    from fastvideo_jax.models.loader import orbax_io
    from fastvideo_jax.models.loader.component_loader import export_component
    from fastvideo_jax.models.loader.pipeline_loader import MODEL_LOADERS
    from fastvideo_jax.models.loader.safetensors_io import save_safetensors

    import jax

    from fastvideo_jax.parallel.mesh import make_mesh

    # Conversion is host work: load onto the CPU so a model larger than one accelerator's memory converts.
    host = make_mesh(devices=jax.devices("cpu")[:1])
    model = MODEL_LOADERS[name]().load(src, precision=precision, mesh=host, **_implied_config(src))
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    if to == "orbax":
        from flax import nnx

        orbax_io.save_params(dst, nnx.state(model, nnx.Param), model.config.precision)
    else:
        weights = ("model.safetensors" if name.startswith(("text_encoder", "image_encoder"))  # Transformers
                   else "diffusion_pytorch_model.safetensors")
        save_safetensors(dst / weights, export_component(model), metadata={"format": "pt"})


def _implied_config(src: Path) -> dict:
    """Config fields the component's own tensors imply (``checkpoint_implied_config``: e.g. FastWan's VSA gates
    need the video sparse attention mode), so that every tensor is carried across."""
    import re

    from fastvideo_jax.models.loader import orbax_io
    from fastvideo_jax.models.loader.component_loader import read_config
    from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint
    from fastvideo_jax.models.registry import resolve_model_cls

    raw = read_config(src)
    cls, _ = resolve_model_cls(raw, str(src / "config.json"))
    rules = cls.config_class().update_model_arch(raw).arch_config.checkpoint_implied_config
    if not rules:
        return {}
    names = orbax_io.stored_names(src) if orbax_io.is_converted(src) else set(SafetensorsCheckpoint.from_dir(src))
    out: dict = {}
    for pattern, fields in rules:
        if any(re.search(pattern, n) for n in names):
            out.update(dict(fields))
    return out


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


def _plan(src: Path, dtype: str | None) -> list[_Component]:
    """Every component to write, checked before any work: each folder model_index.json lists exists, each
    model's config names a class of its kind, and the class builds at the precision it will be written in
    (UMT5, for one, refuses fp16)."""
    from fastvideo_jax.models.loader.pipeline_loader import check_components, component_kind, read_model_index

    index = read_model_index(src)
    missing = [n for n, (lib, cls) in index.items() if (lib, cls) != (None, None) and not (src / n).is_dir()]
    if missing:
        raise CheckpointError(f"{src}/model_index.json lists {missing}, but SRC has no such folder "
                              f"({'it is' if len(missing) == 1 else 'they are'} missing or not directories)")
    present = [n for n in index if (src / n).is_dir()]  # an entry [null, null] without folder: not in this pipeline
    configs = check_components(src, [n for n in present if component_kind(n) == "model"])
    plan = []
    for name in present:
        precision = stored = None
        if name in configs:
            stored = _source_precision(src / name)
            precision = dtype or stored
            _check_builds(src / name, configs[name], precision, dtype)
        plan.append(_Component(name, component_kind(name), precision, stored))
    return plan


def _check_builds(folder: Path, raw: dict, precision: str, dtype: str | None) -> None:
    from fastvideo_jax.models.loader.component_loader import build_abstract
    from fastvideo_jax.models.registry import resolve_model_cls

    cls, arch = resolve_model_cls(raw, str(folder / "config.json"))
    config = cls.config_class().update_model_arch(raw).update_model_config(precision=precision)
    try:
        build_abstract(cls, config)
    except (ValueError, TypeError) as e:
        how = f"--dtype {dtype}" if dtype else f"its stored precision {precision}"
        raise UserError(f"{folder}: {arch} cannot be converted at {how}: {e}") from e


def _check_space(src: Path, plan: list[_Component], dst: Path) -> None:
    """Refuse up front when DST's filesystem cannot hold the (estimated) output."""
    need = 0
    for c in plan:
        size = sum(p.stat().st_size for p in (src / c.name).rglob("*") if p.is_file())
        if c.precision is not None:
            size = size * _ITEMSIZE[c.precision] // _ITEMSIZE.get(c.stored, 4)
        need += size
    where = next(p for p in (dst, *dst.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise OutputPathError(f"no space left on device: {where} has {free / 2**20:.1f} MiB free, the converted "
                              f"pipeline needs about {need / 2**20:.1f} MiB")


def _check_dst(dst: Path, overwrite: bool) -> None:
    if os.path.lexists(dst) and not dst.is_dir():
        raise OutputPathError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "model_index.json").is_file():
        raise OutputPathError(f"{dst}: --overwrite replaces only a pipeline directory (with model_index.json) or "
                              "an empty one; this one holds other files")


def _write_index(src: Path, dst: Path, to: str, dtype: str | None) -> None:
    index = json.loads((src / "model_index.json").read_text())
    index.pop("_fastvideo_jax", None)
    if to == "orbax":
        index["_fastvideo_jax"] = {"format": "orbax", "dtype": dtype}
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "orbax", dtype: str | None = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the pipeline at SRC (directory or repo id) into DST; returns DST's real path.

    Everything that can be checked is checked before any work (paths, every component folder and class, the
    precision, free space); the output is built beside DST and renamed into place (see ``output_dir``)."""
    from fastvideo_jax.models.loader.orbax_io import is_no_space
    from fastvideo_jax.models.loader.pipeline_loader import resolve_model_path

    if to not in ("orbax", "diffusers"):
        raise UserError(f"--to must be 'orbax' or 'diffusers', got {to!r}")
    if dtype not in (None, *_ITEMSIZE):
        raise UserError(f"--dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    src = resolve_model_path(src)
    check_separate(src, Path(dst).expanduser())
    src, dst = Path(os.path.realpath(src)), Path(os.path.realpath(Path(dst).expanduser()))
    _check_dst(dst, overwrite)
    plan = _plan(src, dtype)
    _check_space(src, plan, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with DirLock(dst), terminate_as_interrupt():
        clean_stale(dst)
        _check_dst(dst, overwrite)  # again under the lock: another run may have finished meanwhile
        expected = identity(dst)
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(dst), dir=dst.parent))
        try:
            give_ordinary_mode(tmp)  # mkdtemp's 0700 would follow the rename into place
            _write_all(src, tmp, plan, to, dtype, progress)
            publish(tmp, dst, expected)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) and is_no_space(e):
                raise OutputPathError(f"no space left on device: {dst.parent} (nothing was written)") from e
            raise
    return dst


def _write_all(src: Path, tmp: Path, plan: list[_Component], to: str, dtype: str | None, progress: bool) -> None:
    for c in tqdm(plan, desc="converting", unit="component", disable=not progress):
        if c.kind == "model":
            _write_model(c.name, src / c.name, tmp / c.name, to, c.precision)
        else:
            shutil.copytree(src / c.name, tmp / c.name)
    _write_index(src, tmp, to, dtype)


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Diffusers pipeline directory, converted directory, or Hugging Face repo id")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--to", choices=["orbax", "diffusers"], default="orbax",
                   help="orbax: our fast-loading format (default); diffusers: safetensors with Diffusers names")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="parameter precision to store (default: the source's; norms and modulation tables "
                   "stay fp32 as in the original models; fp16 is refused up front for a model that cannot hold "
                   "it, such as the UMT5 text encoder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pipeline directory DST (swapped in only after success)")
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
