"""``fastvideo-jax generate``: one prompt to one mp4.

Everything that can be checked cheaply is checked before weights load: the output path, the numbers given,
the model's configs, tokenizer and scheduler, and whether the request fits the model (its RoPE table).
"""

from __future__ import annotations

import argparse

from fastvideo_jax.configs.pipelines.registry import TINY_STEPVIDEO_ID, TINY_WAN_I2V_ID, TINY_WAN_ID


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a text prompt (and an image, for image-to-video models)",
        description="Generate a video with a Diffusers-format Wan pipeline (text-to-video, or image-to-video "
        "with --image). Options left out take the "
        "model's defaults (e.g. Wan2.1-T2V-1.3B: 480x832, 81 frames, 50 steps, guidance 3.0); a local directory "
        "gets the defaults of the model its transformer config matches. "
        f"'--model {TINY_WAN_ID}' runs a built-in random-weight pipeline (noise output) in seconds on a CPU.",
    )
    p.add_argument("--model", required=True,
                   help=f"pipeline directory, Hugging Face repo id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), "
                   f"{TINY_WAN_ID} or "
                   f"{TINY_WAN_I2V_ID} (its image-to-video twin, with --image) or {TINY_STEPVIDEO_ID} (StepVideo)")
    p.add_argument("--prompt", required=True, help="what the video should show")
    p.add_argument("--image", default=None,
                   help="the first frame of an image-to-video model (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers): an "
                   "image file, resized to --height x --width; refused by a text-to-video model")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (classifier-free guidance)")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels, a multiple of 16")
    p.add_argument("--num-frames", type=int, default=None, help="number of frames, 1 + 4k (e.g. 81)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps, 1 to 1000 (more: slower, finer)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance strength, finite and >= 0; 1 or less disables guidance "
                   "(one forward per step)")
    p.add_argument("--teacache-thresh", type=float, default=None,
                   help="TeaCache threshold (FastVideo's rule): skip the transformer blocks on steps whose timestep "
                   "modulation changed less than this since the last computed step, reusing that step's residual. "
                   "0 (default) = off; FastVideo uses 0.08 for Wan2.1-T2V-1.3B and 0.2 for 14B (faster, "
                   "slightly different video)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the initial noise (same seed, same video)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the written mp4")
    p.add_argument("--output", default="output.mp4",
                   help="the .mp4 to write (default: output.mp4); missing parent folders are created, an existing "
                   "file is replaced only once the new video is complete")
    p.add_argument("--flow-shift", type=float, default=None, help="override the scheduler's flow shift (> 0)")
    p.add_argument("--dit-precision", choices=["bf16", "fp32"], default=None, help="override the DiT precision")
    p.add_argument("--self-attention", choices=["dense", "video_sparse"], default=None,
                   help="the DiT's self-attention: dense, or video sparse attention (FastWan presets default to it)")
    p.add_argument("--vsa-sparsity", type=float, default=None,
                   help="video sparse attention: fraction of KV cubes each query cube skips, in [0, 1) (FastWan: 0.8)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in overlapping spatial tiles (less device memory for large frames; tile seams "
                   "are blended, so the result differs slightly from an untiled decode)")
    p.add_argument("--lora", default=None,
                   help="a LoRA for the DiT: a Diffusers/PEFT .safetensors (e.g. saved by WanPipeline.save_lora_weights "
                   "or our trainer) or an original-format Wan LoRA, or a folder holding "
                   "pytorch_lora_weights.safetensors; merged into the weights; checked before weights load")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1.0)")
    p.add_argument("--mesh", default=None,
                   help="split the work over devices, e.g. data=2,sequence=4 (axes data, fsdp, tensor, sequence; "
                        "CFG runs on data, video tokens on sequence). Default with several devices: CFG on data, "
                        "the rest on sequence")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from fastvideo_jax.configs.sample import SamplingParam
    from fastvideo_jax.entrypoints.model_spec import ModelSpec
    from fastvideo_jax.entrypoints.video_generator import VideoGenerator
    from fastvideo_jax.errors import UserError
    from fastvideo_jax.models.encoders.image_processor import load_rgb
    from fastvideo_jax.parallel.distributed import initialize_from_env
    from fastvideo_jax.utils.video import check_output_path

    initialize_from_env()  # multi-host when FASTVIDEO_JAX_COORDINATOR/... or FASTVIDEO_JAX_DISTRIBUTED=auto is set
    check_output_path(args.output)  # a bad path must not throw away a generation
    if args.lora is None and args.lora_scale != 1.0:
        raise UserError("--lora-scale needs --lora PATH")
    sampling = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, seed=args.seed, fps=args.fps,
                    teacache_thresh=args.teacache_thresh)
    SamplingParam(prompt=args.prompt).replace(**sampling).validate()  # the numbers, before the model is looked up
    image = None if args.image is None else load_rgb(args.image)  # a readable RGB image, before the model
    overrides = {k: v for k, v in {"flow_shift": args.flow_shift, "dit_precision": args.dit_precision,
                                   "vae_tiling": args.vae_tiling or None, "self_attention": args.self_attention,
                                   "vsa_sparsity": args.vsa_sparsity}.items() if v is not None}
    spec = ModelSpec.open(args.model, **overrides)  # configs, tokenizer folder, scheduler class; no weights yet
    spec.sampling_param(prompt=args.prompt, **sampling)  # fits the model (RoPE table), before loading weights
    image = spec.pipeline_cls.check_image(image, spec.config)  # the model takes (or needs) an image
    generator = VideoGenerator.from_spec(spec, mesh=args.mesh, lora=args.lora, lora_scale=args.lora_scale)
    out = generator.generate_video(args.prompt, image=image, output_path=args.output, progress=not args.no_progress,
                                   **sampling)
    frames = out["frames"]
    if "path" in out:  # multi-host: process 0 writes
        print(f"wrote {out['path']} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
              f"{out['seconds']:.1f} s)")
        if "teacache" in out:
            tc = out["teacache"]
            print(f"teacache: blocks skipped on {len(tc['skipped_steps'])} of {tc['steps']} steps "
                  f"({tc['skipped_calls']} of {tc['calls']} cond/uncond calls from the cache)")
    return 0
