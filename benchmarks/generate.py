"""Text-to-video generation: ours vs diffusers' WanPipeline on the same random weights, per stage.

    python benchmarks/generate.py --preset tiny                  # CPU, seconds
    python benchmarks/generate.py --preset wan2.1-1.3b-480p      # one GPU: 480x832x81, 50 steps, CFG
    python benchmarks/generate.py --preset tiny --num-inference-steps 30 --teacache-thresh 0.08

With ``--teacache-thresh`` our denoising also runs under TeaCache at that threshold (after its own warm-up),
alternating with the plain loop (best of 3 each), and the steps it skipped and its speed-up over threshold 0 are
printed.

Builds random PyTorch components (DiT, UMT5, VAE), saves the pipeline with save_pretrained, loads it with our
VideoGenerator, and times text encoding, denoising and VAE decoding for both (ours after a warm-up run that
compiles; compile time printed separately), then the end-to-end totals and ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "tiny": dict(
        dit=dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        t5=dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
        vae=dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        request=dict(height=64, width=64, num_frames=9, num_inference_steps=4), text_len=32,
    ),
    "wan2.1-1.3b-480p": dict(
        dit=dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960, num_layers=30),
        t5=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128),
        vae=dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
        request=dict(height=480, width=832, num_frames=81, num_inference_steps=50), text_len=512,
    ),
}
# The device check's end-to-end run: the real 1.3B DiT and VAE at 480x832x81, 50 steps, CFG, but a UMT5-XXL cut
# to 4 of its 24 layers, so building and saving random text-encoder weights fits the device session (the text
# stage's time is then not the real one; the DiT and VAE stages are).
PRESETS["wan2.1-1.3b-480p-t5x4"] = dict(PRESETS["wan2.1-1.3b-480p"], t5=dict(PRESETS["wan2.1-1.3b-480p"]["t5"], num_layers=4))


def build_pipeline(root: str, preset: dict, dtype) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo_jax.testing.tokenizer import build_t5_tokenizer

    torch.manual_seed(0)
    pipe = WanPipeline(
        tokenizer=build_t5_tokenizer(),
        text_encoder=UMT5EncoderModel(UMT5Config(**preset["t5"], feed_forward_proj="gated-gelu", dropout_rate=0.0)),
        transformer=WanTransformer3DModel(**preset["dit"]).to(dtype),
        vae=AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], **preset["vae"]),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    pipe.save_pretrained(root)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_ours(root, args, preset, prompt, negative):
    import jax

    from fastvideo_jax import VideoGenerator

    gen = VideoGenerator.from_pretrained(root, dit_precision=args.dtype, vae_decode_precision=args.dtype,
                                         text_len=preset["text_len"])
    req = dict(_request(preset, args), negative_prompt=negative, guidance_scale=5.0, seed=0)
    # Compiles every stage; two steps are enough (scheduler tables are padded, so 50 steps reuse the executable).
    _, warm = _timed(lambda: gen.generate_video(prompt, progress=False, **dict(req, num_inference_steps=2)))
    p = gen.pipeline
    param = gen.sampling_param(prompt=prompt, **req)
    ctx, t_text = _timed(lambda: jax.block_until_ready(p.encode_text([prompt], [negative])))
    z0 = p.prepare_latents(p.latent_shape(1, param.num_frames, param.height, param.width), 0)
    z, t_denoise = _timed(lambda: jax.block_until_ready(p.denoise(z0, ctx, param.num_inference_steps, 5.0, False)))
    _, t_decode = _timed(lambda: p.decode(z))
    out = {"text": t_text, "denoise": t_denoise, "decode": t_decode, "first run (compile)": warm}
    if args.teacache_thresh:  # best of 3, alternating, against the plain loop on the same inputs
        def run(steps, thresh):
            return jax.block_until_ready(p.denoise(z0, ctx, steps, 5.0, False, teacache_thresh=thresh))

        run(2, args.teacache_thresh)  # compiles the cached step (steps and threshold are data: no further compile)
        n = param.num_inference_steps
        times = {0.0: [], args.teacache_thresh: []}
        for _ in range(3):
            for thresh in times:
                times[thresh].append(_timed(lambda: run(n, thresh))[1])
        run(n, args.teacache_thresh)
        out["denoise plain best"], out["denoise teacache"] = min(times[0.0]), min(times[args.teacache_thresh])
        out["teacache"] = p.last_teacache
    return out


def _request(preset, args) -> dict:
    req = dict(preset["request"])
    if args.num_inference_steps is not None:
        req["num_inference_steps"] = args.num_inference_steps
    return req


def run_diffusers(root, args, preset, prompt, negative):
    import torch
    from diffusers import WanPipeline

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = WanPipeline.from_pretrained(root).to(dev)
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    req = _request(preset, args)

    def stage(fn):
        def run():
            with torch.no_grad():
                out = fn()
            sync()
            return out
        return _timed(run)

    (pe, ne), t_text = stage(lambda: pipe.encode_prompt(prompt, negative, True, max_sequence_length=preset["text_len"],
                                                        device=dev))
    pe, ne = pe.to(dtype), ne.to(dtype)
    z, t_denoise = stage(lambda: pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0,
                                      output_type="latent", **req).frames)
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(z)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(z)
    _, t_decode = stage(lambda: pipe.vae.decode((z * std + mean).to(pipe.vae.dtype)).sample)
    return {"text": t_text, "denoise": t_denoise, "decode": t_decode}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="DiT/VAE precision (default bf16 on GPU)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--teacache-thresh", type=float, default=0.0,
                   help="also time our denoising under TeaCache at this threshold (0: not run)")
    args = p.parse_args(argv)
    import jax
    import torch

    args.dtype = args.dtype or ("bf16" if jax.devices()[0].platform == "gpu" else "fp32")
    preset = PRESETS[args.preset]
    prompt, negative = "a cat playing piano in a sunny room", "blurry, low quality"
    with tempfile.TemporaryDirectory() as root:
        build_pipeline(root, preset, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
        ours = run_ours(root, args, preset, prompt, negative)
        ref = run_diffusers(root, args, preset, prompt, negative)
    print(f"preset {args.preset} {_request(preset, args)} {args.dtype} on {jax.devices()[0].device_kind}")
    print(f"{'stage':22s} {'ours s':>9s} {'diffusers s':>12s} {'speedup':>8s}")
    for stage in ("text", "denoise", "decode"):
        print(f"{stage:22s} {ours[stage]:9.3f} {ref[stage]:12.3f} {ref[stage] / ours[stage]:7.2f}x")
    tot_o, tot_r = (sum(d[s] for s in ("text", "denoise", "decode")) for d in (ours, ref))
    print(f"{'end to end':22s} {tot_o:9.3f} {tot_r:12.3f} {tot_r / tot_o:7.2f}x")
    print(f"{'ours first run':22s} {ours['first run (compile)']:9.3f}  (2-step warm-up: compiles every stage)")
    if args.teacache_thresh:
        tc = ours["teacache"]
        speedup = ours["denoise plain best"] / ours["denoise teacache"]
        print(f"{'denoise, best of 3':22s} {ours['denoise plain best']:9.3f}  threshold 0 (TeaCache off)")
        print(f"{'denoise teacache':22s} {ours['denoise teacache']:9.3f}  threshold {args.teacache_thresh}: blocks "
              f"skipped on {len(tc['skipped_steps'])} of {tc['steps']} steps {tc['skipped_steps']} "
              f"({tc['skipped_calls']} of {tc['calls']} cond/uncond calls); {speedup:.2f}x vs threshold 0")
    from _results import record

    case = f"generate {args.preset} ({args.dtype}, {_request(preset, args)}, CFG)"
    for stage in ("text", "denoise", "decode"):
        record(case, stage, ours_ms=ours[stage] * 1e3, peer_ms=ref[stage] * 1e3, speedup=ref[stage] / ours[stage])
    record(case, "end to end", ours_ms=tot_o * 1e3, peer_ms=tot_r * 1e3, speedup=tot_r / tot_o,
           ours_first_run_s=ours["first run (compile)"])
    if args.teacache_thresh:
        record(case, f"denoise teacache {args.teacache_thresh}", ours_ms=ours["denoise teacache"] * 1e3,
               peer_ms=ours["denoise plain best"] * 1e3, speedup=speedup, skipped_steps=len(tc["skipped_steps"]))


if __name__ == "__main__":
    main()
