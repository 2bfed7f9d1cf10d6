"""Checkpoint loading: time and peak host RSS, safetensors vs orbax, on 1 and 8 (fake CPU) devices.

    python benchmarks/load.py                       # Wan2.1-1.3B size (2.8 GB bf16), written locally once
    python benchmarks/load.py --preset tiny         # seconds

Writes a random Diffusers-layout transformer checkpoint (and its orbax conversion) into --workdir, then
loads it in a fresh subprocess per case (so the device count and the RSS peak are per case) and prints load
time, peak RSS, and peak RSS as a multiple of the largest tensor and of the whole checkpoint. On fake CPU
devices the loaded parameters live in host memory, so they are part of the RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {"tiny": "tiny", "wan2.1-1.3b": "wan2.1-t2v-1.3b"}
MESHES = {"1": {}, "8": {"fsdp": 8}}


def write_checkpoint(directory: Path, preset: str) -> None:
    """Random bf16 weights with the exact names/shapes of a Diffusers WanTransformer3DModel (no torch)."""
    from fastvideo_jax.testing import write_random_dit

    write_random_dit(directory, preset, precision="bf16")


def _hwm_bytes() -> int:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it is not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(path: str, mesh: str) -> None:
    """Runs in a subprocess: load once and print a JSON line."""
    import jax

    from fastvideo_jax.models.loader.component_loader import TransformerLoader
    from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh

    base = _hwm_bytes()
    t0 = time.perf_counter()
    model = TransformerLoader().load(path, precision="bf16", mesh=make_mesh(MeshConfig(**MESHES[mesh])))
    jax.block_until_ready(jax.tree.leaves(model))
    sec = time.perf_counter() - t0
    peak = _hwm_bytes()
    print(json.dumps({"seconds": sec, "peak": peak, "base": base}))


def run_case(path: Path, mesh: str) -> dict:
    from _results import child_env

    env = child_env(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={mesh}")
    out = subprocess.run([sys.executable, __file__, "--child", str(path), mesh], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-1.3b", choices=sorted(PRESETS))
    p.add_argument("--workdir", default="/tmp/fastvideo_jax_load_bench")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)

    from fastvideo_jax.entrypoints.convert_cli import convert
    from fastvideo_jax.models.loader.safetensors_io import SafetensorsCheckpoint

    work = Path(args.workdir) / args.preset
    pipe = work / "diffusers"
    if not (pipe / "transformer" / "config.json").is_file():
        print(f"writing a random {args.preset} checkpoint to {pipe} ...", flush=True)
        write_checkpoint(pipe / "transformer", PRESETS[args.preset])
        (pipe / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"]}))
    if not (work / "orbax" / "model_index.json").is_file():
        print("converting to orbax ...", flush=True)
        convert(pipe, work / "orbax", dtype="bf16", overwrite=True, progress=False)
    ckpt = SafetensorsCheckpoint.from_dir(pipe / "transformer")
    total = ckpt.nbytes
    largest = max(i.end - i.start for i in ckpt.values())
    print(f"checkpoint {total / 2**30:.2f} GiB in {len(ckpt)} tensors, largest tensor {largest / 2**20:.1f} MiB")
    print(f"{'source':12s} {'devices':>7s} {'load s':>8s} {'peak RSS':>10s} {'x largest':>10s} {'x ckpt':>7s} "
          f"{'(RSS before load)':>18s}")
    for source, path in (("safetensors", pipe / "transformer"), ("orbax", work / "orbax" / "transformer")):
        for mesh in MESHES:
            r = run_case(path, mesh)
            print(f"{source:12s} {mesh:>7s} {r['seconds']:8.2f} {r['peak'] / 2**30:8.2f} G {r['peak'] / largest:10.1f} "
                  f"{r['peak'] / total:7.2f} {r['base'] / 2**30:16.2f} G", flush=True)


if __name__ == "__main__":
    main()
