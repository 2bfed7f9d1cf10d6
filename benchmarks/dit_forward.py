"""DiT forward: ours (JAX) vs diffusers (PyTorch) on the same random weights, in one run.

    python benchmarks/dit_forward.py --preset tiny                 # CPU smoke run
    python benchmarks/dit_forward.py --preset wan2.1-1.3b-480p     # one GPU (bf16)
    python benchmarks/dit_forward.py --model hunyuan --preset tiny
    python benchmarks/dit_forward.py --model hunyuan --preset hunyuanvideo-720p   # 13B, 720x1280x129f: GPU only

Builds a random diffusers DiT (WanTransformer3DModel, or HunyuanVideoTransformer3DModel with --model hunyuan:
padded text mask, pooled CLIP projection and embedded guidance as its pipeline passes them), saves it
with save_pretrained, loads it through our
TransformerLoader, runs both on the same inputs and prints per-forward times, our first-call compile time,
peak device memory of each and the ratios. Also reports the max-abs difference between the two outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAN_PRESETS = {
    # arch config (diffusers kwargs), latent shape (B, C, F, H, W), text tokens
    "tiny": (dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                  rope_max_seq_len=32), (1, 16, 3, 16, 16), 16),
    "wan2.1-1.3b-480p": (dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                              ffn_dim=8960, num_layers=30), (1, 16, 21, 60, 104), 512),
    "wan2.1-14b-720p": (dict(num_attention_heads=40, attention_head_dim=128, text_dim=4096, freq_dim=256,
                             ffn_dim=13824, num_layers=40), (1, 16, 21, 90, 160), 512),
}
HUNYUAN_PRESETS = {
    # 720x1280, 129 frames: latents 16 x 33 x 90 x 160 (118,800 video tokens) and the pipeline's 256 LLaMA tokens
    "tiny": (dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                  num_single_layers=2, mlp_ratio=2.0, text_embed_dim=16, pooled_projection_dim=12,
                  rope_axes_dim=(2, 2, 4)), (1, 4, 3, 16, 16), 16),
    "hunyuanvideo-720p": (dict(), (1, 16, 33, 90, 160), 256),  # diffusers' defaults are the released 13B model
}
MODELS = {"wan": ("WanTransformer3DModel", WAN_PRESETS), "hunyuan": ("HunyuanVideoTransformer3DModel", HUNYUAN_PRESETS)}
PRESETS = WAN_PRESETS
_FP32_INPUTS = ("timestep", "guidance")  # kept in fp32 whatever the model dtype, as the pipelines pass them


def make_inputs(model: str, arch: dict, shape, text_len: int, rng) -> dict:
    """The DiT's keyword inputs (diffusers' names, which are ours too) as numpy arrays."""
    B = shape[0]
    x = rng.standard_normal(shape, dtype=np.float32)
    t = np.array([500.0] * B, np.float32)
    if model == "wan":
        ctx = rng.standard_normal((B, text_len, arch["text_dim"]), dtype=np.float32)
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx)
    ctx = rng.standard_normal((B, text_len, arch.get("text_embed_dim", 4096)), dtype=np.float32)
    mask = (np.arange(text_len)[None, :] < max(1, (3 * text_len) // 4)).astype(np.int64).repeat(B, 0)  # padded
    pooled = rng.standard_normal((B, arch.get("pooled_projection_dim", 768)), dtype=np.float32)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_attention_mask=mask,
                pooled_projections=pooled, guidance=np.full((B,), 6000.0, np.float32))


def _time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_torch(model_dir, dtype_name, class_name, inputs, iters, compile_model):
    import diffusers
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = getattr(diffusers, class_name).from_pretrained(model_dir, torch_dtype=dtype).to(dev).eval()
    if compile_model:
        model = torch.compile(model)
    kw = {k: torch.from_numpy(a).to(dev) for k, a in inputs.items()}
    kw = {k: v.to(dtype) if v.is_floating_point() and k not in _FP32_INPUTS else v for k, v in kw.items()}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        with torch.no_grad():
            out = model(**kw, return_dict=False)[0]
        sync()
        return out

    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _time(step, iters)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return sec, first, peak, out.float().cpu().numpy()


def run_jax(model_dir, dtype_name, inputs, iters, backend):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fastvideo_jax.models.loader.component_loader import TransformerLoader

    model = TransformerLoader().load(model_dir, precision=dtype_name, attention_backend=backend)
    graphdef, state = nnx.split(model)
    act = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32

    @jax.jit
    def forward(state, kw):
        return nnx.merge(graphdef, state)(**kw)

    kw = {k: jnp.asarray(a, act if a.dtype == np.float32 and k not in _FP32_INPUTS else None)
          for k, a in inputs.items()}
    t0 = time.perf_counter()
    compiled = forward.lower(state, kw).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(state, kw).block_until_ready()
    sec = _time(lambda: compiled(state, kw).block_until_ready(), iters)
    stats = jax.local_devices()[0].memory_stats() or {}
    return sec, compile_s, stats.get("peak_bytes_in_use"), np.asarray(out.astype(jnp.float32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wan", choices=sorted(MODELS))
    p.add_argument("--preset", default="tiny", help=f"per model: { {m: sorted(p) for m, (_, p) in MODELS.items()} }")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backend", default=None, help="attention backend for ours (default: platform's best)")
    p.add_argument("--torch-compile", action="store_true", help="also time diffusers under torch.compile")
    args = p.parse_args(argv)

    class_name, presets = MODELS[args.model]
    if args.preset not in presets:
        p.error(f"--model {args.model} has presets {sorted(presets)}, not {args.preset!r}")

    import diffusers
    import jax
    import torch

    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    arch, shape, text_len = presets[args.preset]
    inputs = make_inputs(args.model, arch, shape, text_len, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ref = getattr(diffusers, class_name)(**arch)
        n_params = sum(p.numel() for p in ref.parameters())
        ref.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(d)
        del ref
        print(f"{class_name} preset {args.preset}: {n_params / 1e6:.1f} M params, latents {shape}, "
              f"{text_len} text tokens, {dtype}, "
              f"device {jax.devices()[0].device_kind}")
        tj, compile_s, peak_j, out_j = run_jax(d, dtype, inputs, args.iters, args.backend)
        tt, _, peak_t, out_t = run_torch(d, dtype, class_name, inputs, args.iters, False)
        rows = [("diffusers eager", tt, peak_t)]
        if args.torch_compile:
            tc, first_c, peak_c, _ = run_torch(d, dtype, class_name, inputs, args.iters, True)
            rows.append((f"diffusers compiled (first call {first_c:.1f} s)", tc, peak_c))
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"ours (jax)         : {tj * 1e3:9.2f} ms/forward, compile {compile_s:.1f} s, peak {gib(peak_j)}")
    for name, sec, peak in rows:
        print(f"{name:19s}: {sec * 1e3:9.2f} ms/forward, peak {gib(peak)}  -> speedup {sec / tj:.2f}x")
    err = float(np.abs(out_j - out_t).max())
    print(f"max |ours - diffusers| = {err:.3e} (output max {np.abs(out_t).max():.2f})")
    from _results import record

    for name, sec, peak in rows:
        label = args.preset if args.model == "wan" else f"{args.model} {args.preset}"
        record(f"DiT forward {label} ({dtype}, latents {shape}, {text_len} text tokens)", name,
               ours_ms=tj * 1e3, peer_ms=sec * 1e3, speedup=sec / tj, ours_compile_s=compile_s,
               ours_peak_gib=None if peak_j is None else peak_j / 2**30,
               peer_peak_gib=None if peak is None else peak / 2**30, max_abs_diff=err)


if __name__ == "__main__":
    main()
