"""End-to-end Wan text-to-video with SageAttention (``SAGE_ATTN``) against dense attention: PSNR of the decoded
frames, same weights, prompt and seed; the denoising time of both.

    python benchmarks/sage_psnr.py --preset tiny                    # CPU, a minute: the path runs (jnp Sage)
    python benchmarks/sage_psnr.py --preset wan2.1-1.3b-480p-t5x4   # one GPU: 1.3B DiT, 480x832x81, 50 steps

Builds the random-weight pipeline of ``benchmarks/generate.py`` (real layer sizes, random weights: the video is
not a natural one, so the PSNR measures how far 8-bit attention moves a 50-step trajectory, not visual quality on
trained weights), loads it once with the platform's dense attention and once with its DiT on ``SAGE_ATTN`` (every
self- and cross-attention call), and generates with both. PSNR over all frames of the uint8 video:
``10 log10(255^2 / MSE)``; the goal in issue 15 is >= 30 dB. Timing: after a 2-step warm-up that compiles.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from generate import PRESETS, build_pipeline  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def generators(root: str, dtype: str, text_len: int):
    """(dense VideoGenerator, the same pipeline with its DiT loaded on SAGE_ATTN)."""
    from fastvideo_jax.entrypoints.model_spec import ModelSpec
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator, component_precisions
    from fastvideo_jax.models.loader.component_loader import TransformerLoader
    from fastvideo_jax.models.loader.pipeline_loader import load_components
    from fastvideo_jax.parallel.spec import resolve_mesh

    spec = ModelSpec.open(root, dit_precision=dtype, vae_decode_precision=dtype, text_len=text_len)
    mesh = resolve_mesh(None, num_heads=spec.dit_arch.num_attention_heads)
    precisions = component_precisions(spec.config, spec.components)
    parts = load_components(spec.path, list(spec.components), mesh=mesh, precisions=precisions)
    sage_dit = TransformerLoader().load(Path(spec.path) / "transformer", mesh=mesh, precision=precisions["transformer"],
                                        attention_backend="SAGE_ATTN")
    dense = VideoGenerator(spec.pipeline_cls(parts, spec.config), spec.defaults, spec.path)
    sage = VideoGenerator(spec.pipeline_cls(dict(parts, transformer=sage_dit), spec.config), spec.defaults, spec.path)
    return dense, sage


def run(gen, prompt: str, request: dict) -> tuple[np.ndarray, float]:
    gen.generate_video(prompt, progress=False, **dict(request, num_inference_steps=2))  # compiles every stage
    t0 = time.perf_counter()
    out = gen.generate_video(prompt, progress=False, **request)
    return np.asarray(out["frames"]), time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="DiT/VAE precision (default bf16 on GPU)")
    p.add_argument("--num-inference-steps", type=int, default=None)
    args = p.parse_args(argv)
    import jax
    import torch

    dtype = args.dtype or ("bf16" if jax.devices()[0].platform == "gpu" else "fp32")
    preset = PRESETS[args.preset]
    request = dict(preset["request"], negative_prompt="blurry, low quality", guidance_scale=5.0, seed=0)
    if args.num_inference_steps:
        request["num_inference_steps"] = args.num_inference_steps
    prompt = "a cat playing piano in a sunny room"
    with tempfile.TemporaryDirectory() as root:
        build_pipeline(root, preset, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
        dense, sage = generators(root, dtype, preset["text_len"])
        frames_dense, t_dense = run(dense, prompt, request)
        frames_sage, t_sage = run(sage, prompt, request)
    value = psnr(frames_sage, frames_dense)
    print(f"preset {args.preset} {dtype} {request} on {jax.devices()[0].device_kind}")
    print(f"frames {frames_dense.shape}: PSNR sage vs dense {value:.2f} dB (goal >= 30)")
    print(f"generate (s): dense {t_dense:.3f}, sage {t_sage:.3f} ({t_dense / t_sage:.2f}x)")
    from _results import record

    record(f"sage end to end {args.preset} ({dtype}, {request['num_inference_steps']} steps, CFG)", "frames psnr",
           psnr_db=value, dense_s=t_dense, sage_s=t_sage, speedup=t_dense / t_sage)


if __name__ == "__main__":
    main()
