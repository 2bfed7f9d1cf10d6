"""``fastvideo-jax generate``: one prompt to one mp4."""

from __future__ import annotations

import argparse

from fastvideo_jax.testing.tiny_pipeline import TINY_WAN_ID


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a text prompt",
        description="Generate a video with a Diffusers-format Wan2.1 T2V pipeline. Options left out take the "
        "model's defaults (e.g. Wan2.1-T2V-1.3B: 480x832, 81 frames, 50 steps, guidance 3.0). "
        f"'--model {TINY_WAN_ID}' runs a built-in random-weight pipeline (noise output) in seconds on a CPU.",
    )
    p.add_argument("--model", required=True,
                   help=f"pipeline directory, Hugging Face repo id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), or {TINY_WAN_ID}")
    p.add_argument("--prompt", required=True, help="what the video should show")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (classifier-free guidance)")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels, a multiple of 16")
    p.add_argument("--num-frames", type=int, default=None, help="number of frames, 1 + 4k (e.g. 81)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (more: slower, finer)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance strength; 1 or less disables guidance (one forward per step)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the initial noise (same seed, same video)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the written mp4")
    p.add_argument("--output", default="output.mp4", help="path of the mp4 to write (default: output.mp4)")
    p.add_argument("--flow-shift", type=float, default=None, help="override the scheduler's flow shift")
    p.add_argument("--dit-precision", choices=["bf16", "fp32"], default=None, help="override the DiT precision")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from fastvideo_jax.configs.pipelines.registry import get_model_defaults
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator

    sampling = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, seed=args.seed, fps=args.fps)
    get_model_defaults(args.model)[1].replace(prompt=args.prompt, **sampling).validate()  # before any heavy work
    overrides = {k: v for k, v in {"flow_shift": args.flow_shift, "dit_precision": args.dit_precision}.items() if v is not None}
    generator = VideoGenerator.from_pretrained(args.model, **overrides)
    out = generator.generate_video(args.prompt, output_path=args.output, progress=not args.no_progress, **sampling)
    frames = out["frames"]
    print(f"wrote {out['path']} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{out['seconds']:.1f} s)")
    return 0
