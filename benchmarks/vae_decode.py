"""VAE decode (Wan, HunyuanVideo, StepVideo): ours (JAX) vs the PyTorch original on the same random weights, in one
run (diffusers' classes; StepVideo's is StepFun's code as diffsynth 1.1.9 ships it, tests/stepvideo_oracle.py).

    python benchmarks/vae_decode.py                                # tiny, CPU, fp32
    python benchmarks/vae_decode.py --preset wan-480p-81f          # real Wan2.1 VAE, 1x16x21x60x104 latents, GPU
    python benchmarks/vae_decode.py --preset wan22-704p-121f       # real Wan2.2 VAE, 1x48x31x44x80 latents, GPU
    python benchmarks/vae_decode.py --preset tiny-hunyuan          # tiny HunyuanVideo VAE, CPU
    python benchmarks/vae_decode.py --preset hunyuan-720p-129f --tiled   # real HunyuanVideo VAE, 1x16x33x90x160, GPU
    python benchmarks/vae_decode.py --preset tiny-stepvideo        # tiny StepVideo VAE, CPU
    python benchmarks/vae_decode.py --preset stepvideo-544p-204f --dtype bf16   # real StepVideo VAE, 1x64x36x34x62, GPU

StepVideo without diffsynth installed: the weights come from ``write_random_stepvideo_vae`` and the torch side is
skipped (as with ``--skip-torch``). With ``--tiled`` and more than one chunk, diffsynth's tiled decode leaves the
chunk boundaries unblended (its ``mix`` runs on the channel axis there), so the max difference shows them.

A child process builds a random diffusers ``AutoencoderKLWan`` / ``AutoencoderKLHunyuanVideo`` (torch.manual_seed(0)) and saves it with
save_pretrained; one child per framework then loads it (ours through ``VAELoader``), decodes the same latents
``1 + iters`` times and reports the fastest timed call, our first-call compile time, and peak memory: device
peak on GPU (``memory_stats()['peak_bytes_in_use']`` / ``torch.cuda.max_memory_allocated``), else the child
process's RSS peak (``resource.getrusage``; the parent imports neither framework, so nothing is inherited).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

PRESETS = {
    # VAE family, its config preset (diffusers kwargs), latents (B, C, T, h, w), spatial factor
    "tiny": ("wan", "tiny", (1, 16, 5, 8, 12), 8),
    "wan-480p-81f": ("wan", "wan2.1", (1, 16, 21, 60, 104), 8),
    "tiny-wan2.2": ("wan", "tiny-wan2.2", (1, 48, 5, 4, 6), 16),
    "wan22-704p-121f": ("wan", "wan2.2", (1, 48, 31, 44, 80), 16),  # Wan2.2 TI2V-5B's default 704x1280, 121 frames
    # HunyuanVideo: both sides decode in diffusers' temporal tiles (on by default); --tiled adds spatial tiles.
    "tiny-hunyuan": ("hunyuan", "tiny", (1, 16, 5, 8, 12), 8),
    "hunyuan-720p-129f": ("hunyuan", "hunyuanvideo", (1, 16, 33, 90, 160), 8),  # HunyuanVideo's 720x1280, 129 frames
    # StepVideo: chunks of 3 latent frames -> 17 frames each; --tiled is DiffSynth's tiling (34 latents every 16).
    "tiny-stepvideo": ("stepvideo", "tiny", (1, 4, 6, 2, 3), 16),
    "stepvideo-544p-204f": ("stepvideo", "stepvideo", (1, 64, 36, 34, 62), 16),  # the release's 544x992, 204 frames
}
# family -> (diffusers class name, our config module, its presets table)
FAMILIES = {
    "wan": ("AutoencoderKLWan", "fastvideo_jax.configs.models.vaes.wanvae", "WAN_VAE_PRESETS"),
    "hunyuan": ("AutoencoderKLHunyuanVideo", "fastvideo_jax.configs.models.vaes.hunyuanvae", "HUNYUAN_VAE_PRESETS"),
    "stepvideo": ("AutoencoderKLStepvideo", "fastvideo_jax.configs.models.vaes.stepvideovae", "STEPVIDEO_VAE_PRESETS"),
}


def _frames(family: str, latent_frames: int) -> int:
    if family == "stepvideo":  # 17 per full chunk of 3, 8L - 7 for a last chunk of L < 3
        full, rest = divmod(latent_frames, 3)
        return 17 * full + (8 * rest - 7 if rest else 0)
    return 1 + 4 * (latent_frames - 1)


def _stepvideo_original(arch: dict):
    """StepFun's StepVideoVAE (version 2) at a preset's widths, from diffsynth (ImportError without it)."""
    import torch

    from tests.stepvideo_oracle import diffsynth_module

    m = diffsynth_module("stepvideo_vae")
    m.base_group_norm.spatial = True
    vae = m.StepVideoVAE.__new__(m.StepVideoVAE)
    torch.nn.Module.__init__(vae)
    vae.frame_len, vae.latent_len, vae.world_size = 17, 3, 1
    z = arch.get("z_channels", 64)
    vae.encoder = m.VideoEncoder(ch=arch.get("encoder_ch", 32), ch_mult=arch.get("encoder_ch_mult", (4, 8, 16, 16)),
                                 z_channels=z, version=2)
    vae.decoder = m.VideoDecoder(ch=arch.get("decoder_ch", 128), ch_mult=arch.get("decoder_ch_mult", (1, 2, 4, 4)),
                                 z_channels=z, version=2)
    return vae.eval(), m


def _build_stepvideo(workdir: Path, arch: dict) -> int:
    """The release's layout (``decoder.conv_out.*``) with the original's random init, or ours without diffsynth."""
    try:
        from safetensors.torch import save_file

        model, _ = _stepvideo_original(arch)
    except ImportError:
        from fastvideo_jax.testing import write_random_stepvideo_vae

        write_random_stepvideo_vae(workdir / "vae", arch["_preset"])
        (workdir / "no_torch").touch()
        return -1
    (workdir / "vae").mkdir()
    state = {k.replace("decoder.conv_out.conv.", "decoder.conv_out."): v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, workdir / "vae" / "diffusion_pytorch_model.safetensors")
    body = {k: v for k, v in arch.items() if k != "_preset"}
    (workdir / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLStepvideo", **{
        k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}}))
    return sum(p.numel() for p in model.parameters())


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed(fn, iters: int) -> tuple[float, float, object]:
    """(first call seconds, fastest of ``iters`` further calls, last output)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def child_build(workdir: Path, preset: str, shape) -> None:
    import importlib

    import diffusers
    import torch

    family, arch = PRESETS[preset][:2]
    class_name, module, table = FAMILIES[family]
    presets = getattr(importlib.import_module(module), table)
    torch.manual_seed(0)
    if family == "stepvideo":
        params = _build_stepvideo(workdir, {**presets[arch], "_preset": arch})
        np.save(workdir / "latents.npy", np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        print(json.dumps({"params": params}))
        return
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in presets[arch].items()}
    model = getattr(diffusers, class_name)(**kwargs).eval()
    model.save_pretrained(workdir / "vae")
    np.save(workdir / "latents.npy", np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


def child_jax(workdir: Path, dtype: str, iters: int, tiled: bool) -> None:
    import jax
    import jax.numpy as jnp

    from fastvideo_jax.models.loader.component_loader import VAELoader

    vae = VAELoader().load(workdir / "vae", precision=dtype, load_encoder=False)
    z = jnp.asarray(np.load(workdir / "latents.npy"))
    first, best, out = _timed(lambda: vae.decode(z, tiled=tiled).block_until_ready(), iters)
    on_gpu = jax.devices()[0].platform == "gpu"
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use") if on_gpu else _rss_peak_bytes()
    np.save(workdir / "out_jax.npy", np.asarray(out.astype(jnp.float32)))
    print(json.dumps({"first": first, "sec": best, "peak": peak, "device": jax.devices()[0].device_kind,
                      "peak_kind": "device peak" if on_gpu else "process RSS peak"}))


def child_torch(workdir: Path, dtype: str, iters: int, tiled: bool) -> None:
    import diffusers
    import torch

    config = json.loads((workdir / "vae" / "config.json").read_text())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    z = torch.from_numpy(np.load(workdir / "latents.npy")).to(dev, tdtype)
    if config["_class_name"] == "AutoencoderKLStepvideo":
        from safetensors.torch import load_file

        vae, m = _stepvideo_original(config)
        vae.load_state_dict(m.StepVideoVAEStateDictConverter().from_civitai(
            load_file(workdir / "vae" / "diffusion_pytorch_model.safetensors")))
        vae = vae.to(dev, tdtype)

        def decode(z):  # (B, C, T, h, w) -> (B, C, F, H, W); the original takes time at axis 1 and gives it there
            out = vae.decode(z.permute(0, 2, 1, 3, 4), device=dev, tiled=tiled)  # untiled; tiled: (B, C, F, H, W)
            return out if tiled else out.permute(0, 2, 1, 3, 4)
    else:
        vae = getattr(diffusers, config["_class_name"]).from_pretrained(workdir / "vae", torch_dtype=tdtype)
        vae = vae.to(dev).eval()
        if tiled:
            vae.enable_tiling()

        def decode(z):
            return vae.decode(z).sample

    def step():
        with torch.no_grad():
            out = decode(z)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    first, best, out = _timed(step, iters)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else _rss_peak_bytes()
    np.save(workdir / "out_torch.npy", out.float().cpu().numpy())
    print(json.dumps({"first": first, "sec": best, "peak": peak, "device": dev,
                      "peak_kind": "device peak" if dev == "cuda" else "process RSS peak"}))


def _run_child(*args: str) -> dict:
    from _results import child_env

    env = child_env()
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"child {args[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--iters", type=int, default=1, help="timed decodes after the first (compile/warm-up) call")
    p.add_argument("--tiled", action="store_true", help="spatial tiling (256 px tiles, stride 192) on both sides")
    p.add_argument("--latent-shape", type=int, nargs=5, help="override the preset's latents (B C T h w)")
    p.add_argument("--skip-torch", action="store_true", help="ours only (e.g. no CUDA torch on the GPU machine)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, workdir, *rest = args.child
        workdir = Path(workdir)
        if kind == "build":
            return child_build(workdir, rest[0], tuple(int(s) for s in rest[1:]))
        fn = {"jax": child_jax, "torch": child_torch}[kind]
        return fn(workdir, rest[0], int(rest[1]), rest[2] == "1")

    shape = tuple(args.latent_shape or PRESETS[args.preset][2])
    with tempfile.TemporaryDirectory() as d:
        built = _run_child("build", d, args.preset, *map(str, shape))
        frames, r = _frames(PRESETS[args.preset][0], shape[2]), PRESETS[args.preset][3]
        params = "?" if built["params"] < 0 else f"{built['params'] / 1e6:.2f}"
        print(f"preset {args.preset}: {params} M params, latents {shape} -> {frames} frames "
              f"{shape[3] * r}x{shape[4] * r}, {args.dtype}, tiled={args.tiled}")
        flags = (args.dtype, str(args.iters), "1" if args.tiled else "0")
        ours = _run_child("jax", d, *flags)
        no_torch = args.skip_torch or (Path(d) / "no_torch").exists()
        ref = None if no_torch else _run_child("torch", d, *flags)
        if ref is not None:
            diff = np.abs(np.load(Path(d) / "out_jax.npy") - np.load(Path(d) / "out_torch.npy")).max()
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.3f} GiB"  # noqa: E731
    compile_s = ours["first"] - ours["sec"]
    print(f"ours (jax, {ours['device']}): {ours['sec'] * 1e3:10.1f} ms/decode, compile ~{compile_s:.1f} s "
          f"(first call {ours['first']:.1f} s), {ours['peak_kind']} {gib(ours['peak'])}")
    if ref is None:
        return
    peer = "diffsynth" if PRESETS[args.preset][0] == "stepvideo" else "diffusers"
    print(f"{peer} ({ref['device']}):   {ref['sec'] * 1e3:10.1f} ms/decode, {ref['peak_kind']} {gib(ref['peak'])}")
    ratio_mem = "n/a" if not (ours["peak"] and ref["peak"]) else f"{ours['peak'] / ref['peak']:.2f}x"
    print(f"speedup ({peer} / ours) {ref['sec'] / ours['sec']:.2f}x, peak memory (ours / {peer}) {ratio_mem}")
    print(f"max |ours - {peer}| = {diff:.3e}")
    from _results import record

    record(f"VAE decode {args.preset} ({args.dtype}, latents {shape}, tiled={args.tiled})", peer,
           ours_ms=ours["sec"] * 1e3, peer_ms=ref["sec"] * 1e3, speedup=ref["sec"] / ours["sec"],
           ours_compile_s=compile_s, ours_peak_gib=(ours["peak"] or 0) / 2**30,
           peer_peak_gib=(ref["peak"] or 0) / 2**30, max_abs_diff=float(diff))


if __name__ == "__main__":
    main()
