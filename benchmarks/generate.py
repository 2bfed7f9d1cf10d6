"""Text-to-video generation: ours vs diffusers' WanPipeline on the same random weights, per stage.

    python benchmarks/generate.py --preset tiny                  # CPU, seconds
    python benchmarks/generate.py --preset wan2.1-1.3b-480p      # one GPU: 480x832x81, 50 steps, CFG

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
    req = dict(preset["request"], negative_prompt=negative, guidance_scale=5.0, seed=0)
    # Compiles every stage; two steps are enough (scheduler tables are padded, so 50 steps reuse the executable).
    _, warm = _timed(lambda: gen.generate_video(prompt, progress=False, **dict(req, num_inference_steps=2)))
    p = gen.pipeline
    param = gen.sampling_param(prompt=prompt, **req)
    ctx, t_text = _timed(lambda: jax.block_until_ready(p.encode_text([prompt], [negative])))
    z0 = p.prepare_latents(p.latent_shape(1, param.num_frames, param.height, param.width), 0)
    z, t_denoise = _timed(lambda: jax.block_until_ready(p.denoise(z0, ctx, param.num_inference_steps, 5.0, False)))
    _, t_decode = _timed(lambda: p.decode(z))
    return {"text": t_text, "denoise": t_denoise, "decode": t_decode, "first run (compile)": warm}


def run_diffusers(root, args, preset, prompt, negative):
    import torch
    from diffusers import WanPipeline

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = WanPipeline.from_pretrained(root).to(dev)
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    req = preset["request"]

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
    print(f"preset {args.preset} {preset['request']} {args.dtype} on {jax.devices()[0].device_kind}")
    print(f"{'stage':22s} {'ours s':>9s} {'diffusers s':>12s} {'speedup':>8s}")
    for stage in ("text", "denoise", "decode"):
        print(f"{stage:22s} {ours[stage]:9.3f} {ref[stage]:12.3f} {ref[stage] / ours[stage]:7.2f}x")
    tot_o, tot_r = (sum(d[s] for s in ("text", "denoise", "decode")) for d in (ours, ref))
    print(f"{'end to end':22s} {tot_o:9.3f} {tot_r:12.3f} {tot_r / tot_o:7.2f}x")
    print(f"{'ours first run':22s} {ours['first run (compile)']:9.3f}  (2-step warm-up: compiles every stage)")
    from _results import record

    case = f"generate {args.preset} ({args.dtype}, {preset['request']}, CFG)"
    for stage in ("text", "denoise", "decode"):
        record(case, stage, ours_ms=ours[stage] * 1e3, peer_ms=ref[stage] * 1e3, speedup=ref[stage] / ours[stage])
    record(case, "end to end", ours_ms=tot_o * 1e3, peer_ms=tot_r * 1e3, speedup=tot_r / tot_o,
           ours_first_run_s=ours["first run (compile)"])


if __name__ == "__main__":
    main()
